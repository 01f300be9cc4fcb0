"""`nemoforge serve --emit`: KServe InferenceService and Deployment + Service, validated offline (strict)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from nemoforge.cli import main
from nemoforge.config import load_recipe
from nemoforge.errors import NemoforgeError
from nemoforge.serving import manifests

pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("nemoforge_chart_validate", REPO / "charts" / "validate.py")
chart_validate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chart_validate)

MODEL_URI = "s3://nemoforge/runs/run-1/cpt/model"
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
    isvc = manifests.inferenceservice(recipe, MODEL_URI)
    _valid(validator, [isvc])
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["storageUri"] == MODEL_URI
    assert model["modelFormat"] == {"name": "huggingface"}
    assert model["args"] == [
        "--model_name=nano-child",
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
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/s3-endpoint"] == "minio.minio:9000"
    assert annotations["serving.kserve.io/s3-usehttps"] == "0"
    assert isvc["metadata"]["name"] == "nano-child"


def test_deployment_and_service_run_vllm_on_the_fetched_model(validator, recipe):
    objects = manifests.deployment(recipe, MODEL_URI, image="ghcr.io/nemoforge/serve:0.1.0")
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
    assert MODEL_URI in pod["initContainers"][0]["command"][-1]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]


def test_a_strict_schema_rejects_an_unknown_field(validator, recipe):
    isvc = manifests.inferenceservice(recipe, MODEL_URI)
    isvc["spec"]["predictor"]["model"]["gpus"] = 2
    assert validator.errors(isvc)


def test_a_local_model_cannot_go_to_a_cluster(recipe, tmp_path):
    with pytest.raises(NemoforgeError, match="not an s3:// URI"):
        manifests.inferenceservice(recipe, str(tmp_path))


def test_cli_emits_kserve_for_a_registry_alias(tmp_path, validator):
    from nemoforge import lineage

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lineage.register_model(tracking_uri, "smollm2-135m-child", MODEL_URI, aliases=["champion"])
    out = tmp_path / "isvc.yaml"
    argv = ["serve", "models:/smollm2-135m-child@champion", "--emit", "kserve", "-o", str(out),
            "--tracking-uri", tracking_uri] + [a for o in GPU_OVERRIDES for a in ("--set", o)]  # fmt: skip
    assert main(argv) == 0
    (isvc,) = list(yaml.safe_load_all(out.read_text()))
    _valid(validator, [isvc])
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == MODEL_URI

    out = tmp_path / "deploy.yaml"
    assert main(argv[:3] + ["deployment", "-o", str(out)] + argv[6:]) == 0
    _valid(validator, list(yaml.safe_load_all(out.read_text())))


def test_cli_names_a_missing_registry_alias(tmp_path, capsys):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["serve", "models:/nothing@champion", "--emit", "kserve", "--tracking-uri", tracking_uri])
    assert code == 2
    assert "models:/nothing@champion is not in the model registry" in capsys.readouterr().err
