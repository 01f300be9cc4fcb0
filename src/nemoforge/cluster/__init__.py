"""nemoforge on a Kubernetes cluster: Kubeflow Trainer TrainJobs for distributed training stages
(:mod:`~nemoforge.cluster.trainjob`, :mod:`~nemoforge.cluster.launcher`, :mod:`~nemoforge.cluster.worker`).
Submitting and scheduling recipe runs through the Kubeflow Pipelines API is the top layer's
(``nemoforge_pipelines.kfp_api``): nothing under ``nemoforge`` imports ``kfp``."""
