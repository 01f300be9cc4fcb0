"""The ``resources`` section: each step's Kubernetes resources, images, DeepSpeed and TrainJob settings, and
the honest resource contract (a step is given no GPU or node it cannot use)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from nemoforge.config.base import STAGES, _Section
from nemoforge.planning import GPU_MEMORY_BYTES


class Toleration(_Section):
    key: str
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


ImageSet = Literal["train", "rl", "serve"]
"""Dependency sets with one pinned image each (``components/images/images.yaml``)."""


def split_batch(batch_size: int, world_size: int, accumulation: int) -> int:
    """Sequences per rank per micro-batch: ``batch_size / (world_size * accumulation)``.

    Raises:
        ValueError: the batch does not split into whole micro-batches (names a multiple that does).
    """
    per_step = world_size * accumulation
    if batch_size % per_step:
        fit = max(per_step, round(batch_size / per_step) * per_step)
        raise ValueError(
            f"batch_size={batch_size} does not split over {world_size} ranks x {accumulation} "
            f"accumulation steps: use a multiple of {per_step} (e.g. {fit})"
        )
    return batch_size // per_step


class DeepSpeedConfig(_Section):
    """DeepSpeed ZeRO settings of a stage run as a Kubeflow Trainer TrainJob (``launch`` resolves to trainjob).

    The global batch is the stage's ``batch_size`` (sequences per optimizer step); the micro batch per
    GPU is ``batch_size / (gradient_accumulation_steps * num_nodes * gpu_count)`` and must be whole.
    """

    zero_stage: Literal[2, 3] = Field(3, description="ZeRO stage: 2 shards optimizer state and gradients, 3 also parameters.")
    bf16: bool = Field(True, description="bf16 mixed precision (fp32 master weights in the optimizer).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    overlap_comm: bool = Field(True, description="Overlap gradient reduction with the backward pass.")
    reduce_bucket_size_elements: int = Field(
        500_000_000, ge=1, description="Elements per gradient reduce-scatter bucket."
    )
    stage3_prefetch_bucket_size_elements: int = Field(
        50_000_000, ge=1, description="Parameter elements prefetched ahead of use (ZeRO-3)."
    )


DATA_PARALLEL_STAGES = ("distill", "cpt", "sft", "rl")
"""Stages that train on several GPUs and nodes: torchrun ranks (DDP or DeepSpeed ZeRO), a TrainJob on a cluster."""
ONE_GPU_STAGES = ("corpus", "nas")
"""Steps that load their model onto one device in one process: at most one GPU, one pod.
serve may use ``serve.tensor_parallel_size`` GPUs (:meth:`Recipe._check_serve_gpus`); eval runs in one pod and
shards each model over its GPUs, its tensor-parallel size (:meth:`Recipe._check_tensor_parallel`)."""
ONE_POD_STAGES = (*ONE_GPU_STAGES, "eval")


def cpu_only_label(node_selector: dict[str, str]) -> str | None:
    """The node label in a selector that picks nodes without GPUs, as ``key=value``, or None.

    CPU-only: ``nvidia.com/gpu.present=false`` or ``nvidia.com/gpu.count=0`` (labels of NVIDIA GPU feature
    discovery), or a ``nemoforge.io/pool`` not named ``gpu-*`` (infra/: the CPU ``system`` pool; GPU pools are
    ``gpu-h100``, ``gpu-h200``).
    """
    for key, cpu_value in (("nvidia.com/gpu.present", "false"), ("nvidia.com/gpu.count", "0")):
        if node_selector.get(key, "").lower() == cpu_value:
            return f"{key}={node_selector[key]}"
    pool = node_selector.get("nemoforge.io/pool")
    if pool is not None and not pool.startswith("gpu-"):
        return f"nemoforge.io/pool={pool}"
    return None


class StageResources(_Section):
    """Kubernetes resources of one stage's task (ignored with a warning under kfp.local)."""

    cpu: str = Field("2", description="CPU request and limit (Kubernetes quantity).")
    memory: str = Field("16Gi", description="Memory request and limit (Kubernetes quantity).")
    gpu_count: int = Field(0, ge=0, description="nvidia.com/gpu per pod.")
    accelerator_type: str = Field("nvidia.com/gpu", description="Accelerator resource name.")
    node_selector: dict[str, str] = Field({}, description="Node labels, e.g. nvidia.com/gpu.product.")
    tolerations: list[Toleration] = []
    image_set: ImageSet | None = Field(
        None, description="Image of this stage's pods by dependency set (None: resources.image_set)."
    )
    num_nodes: int = Field(
        1, ge=1, description="Pods (nodes) of a training stage, each with cpu/memory/gpu_count; >1 needs a TrainJob."
    )
    launch: Literal["auto", "task", "trainjob"] = Field(
        "auto",
        description="task: the stage runs in its KFP task's pod (one process); trainjob: the task launches a "
        "Kubeflow Trainer TrainJob (torchrun, one process per GPU) and waits for it; auto: trainjob when the stage "
        "has more than one GPU or node.",
    )
    shm_gib: int = Field(
        0, ge=0, description="Size of /dev/shm in GiB (memory-backed emptyDir; NCCL and DataLoader workers); 0: none."
    )
    retries: int = Field(
        0, ge=0, description="Retries after a failure (pod eviction, node loss); the stage resumes from its checkpoint."
    )
    retry_backoff_s: int = Field(60, ge=0, description="Seconds before the first retry (doubling per retry).")
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        description="Memory of one GPU in GiB, for planning eval's GPUs (nemoforge.planning); None: looked up from "
        "node_selector's nvidia.com/gpu.product (NVIDIA-H200, NVIDIA-H100-80GB-HBM3).",
    )

    @model_validator(mode="after")
    def _check_launch(self) -> StageResources:
        if self.launch == "task" and self.num_nodes > 1:
            raise ValueError(f"launch 'task' runs in one pod but num_nodes={self.num_nodes}: set launch to auto")
        return self

    @property
    def runs_as_trainjob(self) -> bool:
        """True when the task launches a TrainJob instead of running the stage in its own pod."""
        return self.launch == "trainjob" or (self.launch == "auto" and (self.num_nodes > 1 or self.gpu_count > 1))

    def quantities(self) -> dict[str, str]:
        """Kubernetes resource quantities of one pod (its requests, and its limits): ``cpu``, ``memory`` and,
        with GPUs, ``{accelerator_type: gpu_count}``, e.g. ``{"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}``."""
        quantities = {"cpu": self.cpu, "memory": self.memory}
        if self.gpu_count:
            quantities[self.accelerator_type] = str(self.gpu_count)
        return quantities

    def gpu_memory_bytes(self) -> int | None:
        """Memory of one of this stage's GPUs: ``gpu_memory_gib``, else its product label's, else None (unknown)."""
        if self.gpu_memory_gib is not None:
            return int(self.gpu_memory_gib * 2**30)
        return GPU_MEMORY_BYTES.get(self.node_selector.get("nvidia.com/gpu.product", ""))


class TrainerConfig(_Section):
    """The Kubeflow Trainer runtime that TrainJob stages use (trainer.kubeflow.org/v1alpha1)."""

    runtime: str = Field("torch-distributed", description="Name of the (Cluster)TrainingRuntime (torchrun launcher).")
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = Field(
        "ClusterTrainingRuntime", description="Kind of the runtime: cluster-wide or in the run's namespace."
    )
    timeout_s: int = Field(
        7 * 24 * 3600, ge=60, description="Seconds the launcher waits for the TrainJob before deleting it and failing."
    )
    poll_s: float = Field(30.0, gt=0, description="Seconds between TrainJob status reads.")


class ResourcesConfig(_Section):
    base_image: str = Field("python:3.11-slim", description="Image of the lightweight components.")
    image_set: ImageSet | None = Field(
        None,
        description="Image of every task by dependency set, pinned in components/images/images.yaml "
        "(None: base_image, e.g. for the local demo).",
    )
    image_pull_secrets: list[str] = Field([], description="Secrets for pulling the images (every pod).")
    service_account: str | None = Field(
        None, description="Service account of the run's pods and TrainJob pods (None: the KFP default)."
    )
    trainer: TrainerConfig = TrainerConfig()
    corpus: StageResources = Field(
        StageResources(),
        description="The corpus task: CPU by default (it reads, tokenizes and packs data.corpus_uri); give it GPUs "
        "like nas when data.corpus_uri is None and it samples the corpus from a large parent.",
    )
    nas: StageResources = StageResources()
    distill: StageResources = StageResources()
    cpt: StageResources = StageResources()
    sft: StageResources = StageResources()
    rl: StageResources = StageResources()
    eval: StageResources = StageResources()
    serve: StageResources = StageResources()

    @model_validator(mode="after")
    def _check_trainjobs(self) -> ResourcesConfig:
        # the honest resource contract (issue 13 §1): a stage is given no GPU or node it cannot use
        for stage in ("corpus", *STAGES):
            res = getattr(self, stage)
            cpu_label = cpu_only_label(res.node_selector)
            if res.gpu_count and cpu_label:
                raise ValueError(
                    f"resources.{stage}.node_selector {cpu_label} picks CPU-only nodes but resources.{stage}."
                    f"gpu_count={res.gpu_count}: select a GPU pool (nvidia.com/gpu.product: NVIDIA-H200) or set "
                    "gpu_count=0"
                )
        for stage in ONE_POD_STAGES:
            res = getattr(self, stage)
            if res.num_nodes > 1:
                raise ValueError(f"resources.{stage}.num_nodes={res.num_nodes}: {stage} runs in one pod; set 1")
            if stage in ONE_GPU_STAGES and res.gpu_count > 1:
                raise ValueError(f"resources.{stage}.gpu_count={res.gpu_count}: {stage} runs on one GPU today; set 1")
            if res.launch == "trainjob":
                raise ValueError(f"resources.{stage}.launch=trainjob: {stage} runs in one pod; set auto")
            if res.runs_as_trainjob:  # eval on several GPUs: auto would make it a TrainJob
                raise ValueError(
                    f"resources.{stage}.launch=auto: {stage} runs in one pod on its {res.gpu_count} GPUs, which auto "
                    "launches as a TrainJob; set task"
                )
        for stage in DATA_PARALLEL_STAGES:
            res = getattr(self, stage)
            if res.launch == "task" and res.gpu_count > 1:
                raise ValueError(
                    f"resources.{stage}.gpu_count={res.gpu_count}: launch 'task' runs {stage} as one process on one "
                    f"GPU; set resources.{stage}.launch=auto (a TrainJob, one process per GPU) or gpu_count=1"
                )
            if res.runs_as_trainjob and not (res.image_set or self.image_set):
                raise ValueError(
                    f"{stage} runs as a TrainJob, whose workers need the pinned train image: "
                    f"set resources.image_set=train (base_image is for the local demo)"
                )
        return self

