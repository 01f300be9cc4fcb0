"""nemoforge on a Kubernetes cluster: Kubeflow Trainer TrainJobs for distributed training stages
(:mod:`~nemoforge.cluster.trainjob`, :mod:`~nemoforge.cluster.launcher`, :mod:`~nemoforge.cluster.worker`)
and the Kubeflow Pipelines REST API for submitting and scheduling recipe runs
(:mod:`~nemoforge.cluster.kfp_api`, the only module here that imports ``kfp``: its client, never its DSL)."""
