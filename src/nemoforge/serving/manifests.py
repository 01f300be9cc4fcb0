"""Cluster serving manifests for a registered model: a KServe InferenceService, or a Deployment + Service.

Both run vLLM with the recipe's ``serve`` settings (served model name, max model len, tensor
parallel size, trust remote code, reasoning parser) and its ``resources.serve`` (GPUs, CPU, memory,
node selector, tolerations). See ../shared/reference/platform.md §3.

Both pods start with the same two init containers of the pinned serve image (vLLM + nemoforge):
``fetch-model`` downloads the model through nemoforge's artifact store (each file verified against its
recorded sha256; S3 endpoint and credentials from the pod's environment) into ``/mnt/models``, and
``verify-remote-code`` refuses it unless its Python files are the ones nemoforge ships
(:mod:`nemoforge.models.remote_code`): vLLM runs them (``trust_remote_code``), so it starts only after both.

- ``inferenceservice``: KServe's Hugging Face runtime with the vLLM backend on ``--model_dir=/mnt/models``
  (no ``storageUri``: KServe's storage initializer would run after our init containers, unverified).
  KServe's runtime takes underscore-style engine flags; the reasoning parser is passed through as a vLLM
  frontend flag.
- ``deployment``: the serve image's vLLM OpenAI server on ``/mnt/models``.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from nemoforge.config import Recipe, StageResources
from nemoforge.errors import NemoforgeError
from nemoforge.serving.think import PARSER_NAME, PARSER_PLUGIN

MODEL_DIR = "/mnt/models"
PORT = 8000


def k8s_name(text: str) -> str:
    """``text`` as a DNS-1035 label (lowercase alphanumerics and '-', starts with a letter, <= 63 chars)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"m-{name}"
    return name[:63].rstrip("-")


def _resources(res: StageResources) -> dict[str, Any]:
    return {"requests": res.quantities(), "limits": res.quantities()}


def _scheduling(res: StageResources) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if res.node_selector:
        spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in res.tolerations]
    return spec


def _served_name(recipe: Recipe) -> str:
    return recipe.serve.served_model_name or recipe.model.name


def vllm_args(recipe: Recipe, *, style: str) -> list[str]:
    """vLLM engine/frontend flags of the recipe; ``style`` ``kserve`` (underscores) or ``vllm`` (dashes)."""
    cfg = recipe.serve
    flags = {
        "max_model_len": cfg.max_model_len,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "dtype": cfg.dtype,
    }
    if cfg.reasoning_parser:
        flags["reasoning_parser"] = cfg.reasoning_parser
    if cfg.reasoning_parser == PARSER_NAME:
        flags["reasoning_parser_plugin"] = PARSER_PLUGIN  # the serve image has nemoforge installed
    sep = "_" if style == "kserve" else "-"
    args = [f"--{key.replace('_', sep)}={value}" for key, value in flags.items()]
    return args + [f"--trust{sep}remote{sep}code"]


def _check_storage_uri(model_uri: str) -> None:
    if not model_uri.startswith("s3://"):
        raise NemoforgeError(
            f"a cluster pulls the model from S3, but {model_uri} is not an s3:// URI: run the recipe with "
            "storage.artifact_root=s3://BUCKET/PREFIX (or register the s3:// copy of the model)"
        )


def model_init_containers(recipe: Recipe, model_uri: str, *, image: str) -> list[dict[str, Any]]:
    """``fetch-model`` (``model_uri`` into the ``model`` volume at ``/mnt/models``) and ``verify-remote-code``.

    Args:
        recipe: ``storage.s3_endpoint_url`` and ``storage.s3_region``.
        model_uri: the model's s3:// URI.
        image: an image holding nemoforge (the pinned ``serve`` image).
    """
    fetch = (
        "from nemoforge.artifacts import open_store; import os, shutil; "
        f"src = open_store({model_uri!r}, s3_endpoint_url=os.environ.get('AWS_ENDPOINT_URL_S3'), "
        f"s3_region={recipe.storage.s3_region!r}, s3_checksums={recipe.storage.s3_checksums!r}).fetch({model_uri!r}); "
        f"shutil.copytree(src, {MODEL_DIR!r}, dirs_exist_ok=True)"
    )
    verify = ["python", "-m", "nemoforge.models.remote_code", MODEL_DIR]
    return [
        {"name": "fetch-model", "image": image, "command": ["python", "-c", fetch], "env": _env(recipe),
         "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR}, {"name": "tmp", "mountPath": "/tmp"}]},
        {"name": "verify-remote-code", "image": image, "command": verify, "env": _env(recipe),
         "volumeMounts": _model_mounts()},
    ]  # fmt: skip


def _env(recipe: Recipe) -> list[dict[str, str]]:
    env = [{"name": "HOME", "value": "/tmp"}]
    if recipe.storage.s3_endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": recipe.storage.s3_endpoint_url})
    return env


def _model_mounts() -> list[dict[str, Any]]:
    """The verified model (read-only) and a writable /tmp; new dicts each call (no YAML anchors)."""
    return [{"name": "model", "mountPath": MODEL_DIR, "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}]


def _model_volumes() -> list[dict[str, Any]]:
    return [{"name": "model", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]


def inferenceservice(recipe: Recipe, model_uri: str, *, image: str, name: str | None = None) -> dict[str, Any]:
    """A KServe v1beta1 InferenceService serving ``model_uri`` (s3://) with the vLLM backend.

    ``image`` holds nemoforge (the pinned ``serve`` image): it runs :func:`model_init_containers`.

    Raises:
        NemoforgeError: ``model_uri`` is not an s3:// URI.
    """
    _check_storage_uri(model_uri)
    res = recipe.resources.serve
    served = _served_name(recipe)
    predictor: dict[str, Any] = {
        "minReplicas": 1,
        "initContainers": model_init_containers(recipe, model_uri, image=image),
        "model": {
            "modelFormat": {"name": "huggingface"},
            "args": [
                f"--model_name={served}",
                f"--model_dir={MODEL_DIR}",
                "--backend=vllm",
                *vllm_args(recipe, style="kserve"),
            ],
            "env": _env(recipe),
            "resources": _resources(res),
            "volumeMounts": _model_mounts(),
        },
        "volumes": _model_volumes(),
        **_scheduling(res),
    }
    if recipe.resources.service_account:
        predictor["serviceAccountName"] = recipe.resources.service_account
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": k8s_name(name or served),
            "annotations": {"serving.kserve.io/deploymentMode": "Standard"},
        },
        "spec": {"predictor": predictor},
    }


def deployment(recipe: Recipe, model_uri: str, *, image: str, name: str | None = None) -> list[dict]:
    """A Deployment running vLLM's OpenAI server on ``model_uri`` (s3://) and a ClusterIP Service for it.

    ``image`` holds vLLM and nemoforge: the pinned ``serve`` image (components/images/images.yaml).

    Raises:
        NemoforgeError: ``model_uri`` is not an s3:// URI.
    """
    _check_storage_uri(model_uri)
    res = recipe.resources.serve
    served = _served_name(recipe)
    name = k8s_name(name or served)
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "serving"}
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10}
    pod: dict[str, Any] = {
        "initContainers": model_init_containers(recipe, model_uri, image=image),
        "containers": [
            {
                "name": "vllm",
                "image": image,
                "command": ["python", "-m", "vllm.entrypoints.openai.api_server"],
                "args": [
                    f"--model={MODEL_DIR}",
                    f"--served-model-name={served}",
                    "--host=0.0.0.0",
                    f"--port={PORT}",
                    *vllm_args(recipe, style="vllm"),
                ],
                "env": _env(recipe),
                "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
                "startupProbe": {**probe, "failureThreshold": 90},
                "readinessProbe": probe,
                "livenessProbe": {**probe, "periodSeconds": 20, "failureThreshold": 6},
                "resources": _resources(res),
                "volumeMounts": [*_model_mounts(), {"name": "dshm", "mountPath": "/dev/shm"}],
            }
        ],
        "volumes": [
            *_model_volumes(),
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{max(res.shm_gib, 2)}Gi"}},
        ],
        **_scheduling(res),
    }
    if recipe.resources.service_account:
        pod["serviceAccountName"] = recipe.resources.service_account
    if recipe.resources.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in recipe.resources.image_pull_secrets]
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": pod},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "type": "ClusterIP",
                "selector": labels,
                "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
            },
        },
    ]


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """Objects as one multi-document YAML text."""
    return yaml.safe_dump_all(objects, sort_keys=False)
