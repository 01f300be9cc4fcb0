"""A training stage as a Kubeflow Trainer ``TrainJob`` (trainer.kubeflow.org/v1alpha1), built from the recipe.

The job runs ``torchrun --module nemoforge.cluster.worker`` on ``num_nodes`` pods of the stage's image,
one process per GPU, under a torch runtime (``torch-distributed`` by default; DeepSpeed runs inside
torchrun with the config from :func:`~nemoforge.training.deepspeed_config.deepspeed_config`). The pods get the stage's resources, node
selector, tolerations, image pull secrets, service account and ``/dev/shm`` through
``spec.trainer.resourcesPerNode`` and ``spec.runtimePatches`` (Trainer >= 2.2; the removed
``podTemplateOverrides`` is never written). Environment of every worker:

    NEMOFORGE_RECIPE_JSON       the resolved recipe
    NEMOFORGE_INPUTS_JSON       upstream references {"parent"|"model"|"corpus"|"data": {"uri", "digest", ...}}
    NEMOFORGE_DEEPSPEED_CONFIG  the DeepSpeed config (JSON text) for the training layer
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from nemoforge.config import DATA_PARALLEL_STAGES, Recipe, StageResources, TrainConfig
from nemoforge.errors import RecipeError
from nemoforge.training.deepspeed_config import DEEPSPEED_CONFIG_ENV, deepspeed_config

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
PATCH_MANAGER = "nemoforge.io/launcher"
"""``runtimePatches[].manager`` of our patch (the list key: Kueue or webhooks own other entries)."""
NODE = "node"
"""Replicated job and container name of the trainer in the torch and DeepSpeed runtimes."""
WORKER_COMMAND = ["torchrun", "--module", "nemoforge.cluster.worker"]
TRAINING_STAGES = DATA_PARALLEL_STAGES
"""The stages a TrainJob runs: those that train on several GPUs and nodes (distill, cpt, sft, rl)."""


def trainjob_name(run_name: str, stage: str) -> str:
    """A DNS-1035 name (<= 40 characters, leaving room for JobSet's pod suffixes) unique per run and stage.

    >>> trainjob_name("nemoforge-llama-3-1-8b-x7k2p", "distill")
    'nemoforge-llama-3-1-8b-distill-1a4daa37'
    """
    digest = hashlib.sha256(f"{run_name}/{stage}".encode()).hexdigest()[:8]
    slug = re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-")
    slug = re.sub(r"^[^a-z]+", "", slug)[: 40 - len(stage) - len(digest) - 2].rstrip("-")
    return "-".join(p for p in (slug, stage, digest) if p) if slug else f"nf-{stage}-{digest}"




def pod_patch(recipe: Recipe, res: StageResources) -> dict[str, Any]:
    """The Pod spec fields of the ``node`` pods that the runtime does not take from ``spec.trainer``."""
    spec: dict[str, Any] = {}
    if recipe.resources.service_account:
        spec["serviceAccountName"] = recipe.resources.service_account
    if res.node_selector:
        spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in res.tolerations]
    if recipe.resources.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in recipe.resources.image_pull_secrets]
    if res.shm_gib:
        spec["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{res.shm_gib}Gi"}}]
        spec["containers"] = [{"name": NODE, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]
    return spec


def build_trainjob(
    recipe: Recipe,
    stage: str,
    run_name: str,
    inputs: dict[str, dict[str, Any]],
    *,
    image: str,
    namespace: str,
    owner: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainJob manifest that runs ``stage`` of ``run_name`` on the cluster.

    Args:
        recipe: the resolved recipe (``resources.<stage>`` sizes the pods, ``resources.trainer`` names the runtime).
        stage: ``distill``, ``cpt``, ``sft`` or ``rl``.
        run_name: the pipeline run (MLflow parent run, artifact prefix).
        inputs: upstream references by argument name (``parent``, ``model``, ``corpus``; sft: ``model``; rl:
            ``model`` and ``data``, sft's model and data split).
        image: the stage's image reference (the same image as the launcher task).
        namespace: where the job is created (the launcher pod's namespace).
        owner: ``{"name", "uid"}`` of the launcher Pod: the job is garbage-collected with it.

    Raises:
        RecipeError: ``stage`` is not a training stage, or the batch does not split
            (see :func:`~nemoforge.training.deepspeed_config.deepspeed_config`).
    """
    if stage not in TRAINING_STAGES:
        raise RecipeError(f"only {', '.join(TRAINING_STAGES)} run as TrainJobs, not {stage}")
    res: StageResources = getattr(recipe.resources, stage)
    train: TrainConfig = getattr(recipe, stage)
    env = {
        "NEMOFORGE_RECIPE_JSON": recipe.to_json(),
        "NEMOFORGE_INPUTS_JSON": json.dumps(inputs, sort_keys=True),
        DEEPSPEED_CONFIG_ENV: json.dumps(deepspeed_config(train, res), sort_keys=True),
        "NEMOFORGE_NO_PROGRESS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    name = trainjob_name(run_name, stage)
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {
            "app.kubernetes.io/managed-by": "nemoforge",
            "nemoforge.io/stage": stage,
            "nemoforge.io/recipe": recipe.name,
        },
        "annotations": {"nemoforge.io/pipeline-run": run_name},
    }
    if owner:
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": owner["name"], "uid": owner["uid"], "blockOwnerDeletion": False}
        ]
    quantities = res.quantities()
    job: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {
                "apiGroup": GROUP,
                "kind": recipe.resources.trainer.runtime_kind,
                "name": recipe.resources.trainer.runtime,
            },
            "trainer": {
                "image": image,
                "command": WORKER_COMMAND,
                "args": ["--stage", stage, "--run-name", run_name],
                "env": [{"name": k, "value": v} for k, v in env.items()],
                "numNodes": res.num_nodes,
                "numProcPerNode": max(res.gpu_count, 1),
                "resourcesPerNode": {"requests": quantities, "limits": dict(quantities)},
            },
            "activeDeadlineSeconds": recipe.resources.trainer.timeout_s,
        },
    }
    patch = pod_patch(recipe, res)
    if patch:
        job["spec"]["runtimePatches"] = [
            {
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {"replicatedJobs": [{"name": NODE, "template": {"spec": {"template": {"spec": patch}}}}]}
                    }
                },
            }
        ]
    return job
