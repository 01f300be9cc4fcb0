"""`nemoforge serve --emit`: KServe InferenceService and Deployment + Service, validated offline (strict)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from nemoforge.config import load_recipe
from nemoforge.errors import NemoforgeError
from nemoforge.serving import manifests
from nemoforge_cli.main import main

pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("nemoforge_chart_validate", REPO / "charts" / "validate.py")
chart_validate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chart_validate)

MODEL_URI = "s3://nemoforge/runs/run-1/cpt/model"
IMAGE = "ghcr.io/nemoforge/serve:0.1.0"
ENV = [{"name": "HOME", "value": "/tmp"}, {"name": "AWS_ENDPOINT_URL_S3", "value": "http://minio.minio:9000"}]
FETCH = (
    "from nemoforge.artifacts import open_store; import os, shutil; "
    f"src = open_store({MODEL_URI!r}, s3_endpoint_url=os.environ.get('AWS_ENDPOINT_URL_S3'), "
    f"s3_region='us-east-1', s3_checksums='when_required').fetch({MODEL_URI!r}); shutil.copytree(src, '/mnt/models', dirs_exist_ok=True)"
)
INIT_CONTAINERS = [
    {
        "name": "fetch-model",
        "image": IMAGE,
        "command": ["python", "-c", FETCH],
        "env": ENV,
        "volumeMounts": [{"name": "model", "mountPath": "/mnt/models"}, {"name": "tmp", "mountPath": "/tmp"}],
    },
    {
        "name": "verify-remote-code",
        "image": IMAGE,
        "command": ["python", "-m", "nemoforge.models.remote_code", "/mnt/models"],
        "env": ENV,
        "volumeMounts": [
            {"name": "model", "mountPath": "/mnt/models", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    },
]
"""Both manifests: the model is fetched (sha256-verified) and its remote code verified before vLLM starts."""
GPU_OVERRIDES = [
    "serve.max_model_len=4096",
    "serve.tensor_parallel_size=2",
    "serve.reasoning_parser=deepseek_r1",
    "serve.served_model_name=nano-child",
    "resources.serve.gpu_count=2",
    "resources.serve.cpu='8'",
    "resources.serve.memory=64Gi",
    "resources.serve.node_selector={nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}",
    "resources.serve.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
    "storage.s3_endpoint_url=http://minio.minio:9000",
]


@pytest.fixture(scope="module")
def validator() -> chart_validate.Validator:
    return chart_validate.Validator(chart_validate.default_crd_files())


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("smollm2-135m-demo", GPU_OVERRIDES)


def _valid(validator, objects) -> None:
    for obj in objects:
        assert validator.errors(obj) == [], obj["kind"]


def test_inferenceservice_carries_vllm_args_resources_and_scheduling(validator, recipe):
    isvc = manifests.inferenceservice(recipe, MODEL_URI, image=IMAGE)
    _valid(validator, [isvc])
    predictor = isvc["spec"]["predictor"]
    assert predictor["initContainers"] == INIT_CONTAINERS
    assert predictor["volumes"] == [{"name": "model", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    model = predictor["model"]
    assert "storageUri" not in model  # KServe's storage initializer would run after our init containers
    assert model["modelFormat"] == {"name": "huggingface"}
    assert model["volumeMounts"] == INIT_CONTAINERS[1]["volumeMounts"]
    assert model["args"] == [
        "--model_name=nano-child",
        "--model_dir=/mnt/models",
        "--backend=vllm",
        "--max_model_len=4096",
        "--tensor_parallel_size=2",
        "--dtype=bfloat16",
        "--reasoning_parser=deepseek_r1",
        "--trust_remote_code",
    ]
    assert model["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"}
    assert model["resources"]["requests"] == model["resources"]["limits"]
    assert predictor["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert predictor["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert isvc["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode": "Standard"}
    assert isvc["metadata"]["name"] == "nano-child"


def test_deployment_and_service_run_vllm_on_the_fetched_model(validator, recipe):
    objects = manifests.deployment(recipe, MODEL_URI, image=IMAGE)
    _valid(validator, objects)
    deploy, service = objects
    assert [deploy["kind"], service["kind"]] == ["Deployment", "Service"]
    pod = deploy["spec"]["template"]["spec"]
    vllm = pod["containers"][0]
    assert vllm["command"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--served-model-name=nano-child" in vllm["args"]
    assert {"--tensor-parallel-size=2", "--max-model-len=4096", "--trust-remote-code",
            "--reasoning-parser=deepseek_r1"} <= set(vllm["args"])  # fmt: skip
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["initContainers"] == INIT_CONTAINERS
    assert vllm["volumeMounts"][:2] == INIT_CONTAINERS[1]["volumeMounts"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]


def test_a_strict_schema_rejects_an_unknown_field(validator, recipe):
    isvc = manifests.inferenceservice(recipe, MODEL_URI, image=IMAGE)
    isvc["spec"]["predictor"]["model"]["gpus"] = 2
    assert validator.errors(isvc)


def test_a_local_model_cannot_go_to_a_cluster(recipe, tmp_path):
    with pytest.raises(NemoforgeError, match="not an s3:// URI"):
        manifests.inferenceservice(recipe, str(tmp_path), image=IMAGE)


def test_cli_emits_kserve_for_a_registry_alias(tmp_path, validator):
    from nemoforge import lineage

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lineage.Registry(tracking_uri).register_model("smollm2-135m-child", MODEL_URI, aliases=["champion"])
    out = tmp_path / "isvc.yaml"
    argv = ["serve", "models:/smollm2-135m-child@champion", "--emit", "kserve", "-o", str(out),
            "--tracking-uri", tracking_uri] + [a for o in GPU_OVERRIDES for a in ("--set", o)]  # fmt: skip
    assert main(argv) == 0
    (isvc,) = list(yaml.safe_load_all(out.read_text()))
    _valid(validator, [isvc])
    assert isvc["spec"]["predictor"]["initContainers"][0]["command"][-1] == INIT_CONTAINERS[0]["command"][-1]
    assert isvc["spec"]["predictor"]["initContainers"][1]["command"] == INIT_CONTAINERS[1]["command"]

    out = tmp_path / "deploy.yaml"
    assert main(argv[:3] + ["deployment", "-o", str(out)] + argv[6:]) == 0
    _valid(validator, list(yaml.safe_load_all(out.read_text())))


def test_cli_names_a_missing_registry_alias(tmp_path, capsys):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["serve", "models:/nothing@champion", "--emit", "kserve", "--tracking-uri", tracking_uri])
    assert code == 2
    assert "models:/nothing@champion is not in the model registry" in capsys.readouterr().err


def test_cli_serve_from_a_workdir_without_registry_creates_nothing(tmp_path, capsys):
    workdir = tmp_path / "empty"
    workdir.mkdir()
    code = main(["serve", "models:/nothing@champion", "--emit", "kserve", "--workdir", str(workdir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "no registry under --workdir" in err[0] and "nemoforge run" in err[0]
    assert list(workdir.iterdir()) == []


def test_the_default_reasoning_parser_comes_with_its_plugin():
    """nemoforge_think (the default) is a plugin: both manifests load it from the serve image's nemoforge."""
    recipe = load_recipe("smollm2-135m-demo", [o for o in GPU_OVERRIDES if "reasoning_parser" not in o])
    assert manifests.vllm_args(recipe, style="vllm")[-3:-1] == [
        "--reasoning-parser=nemoforge_think",
        "--reasoning-parser-plugin=nemoforge.serving.vllm_reasoning",
    ]
    isvc = manifests.inferenceservice(recipe, MODEL_URI, image=IMAGE)
    assert "--reasoning_parser_plugin=nemoforge.serving.vllm_reasoning" in isvc["spec"]["predictor"]["model"]["args"]
