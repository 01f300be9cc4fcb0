"""The Helm chart renders offline and every object it makes is valid (STYLE.md §9f).

Rendering goes through helm-python-sdk (Helm v4's Go SDK, which also enforces values.schema.json);
core objects are checked with kubernetes-validate (strict) and custom resources against the CRDs in
../shared/schemas/crds (charts/validate.py).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk")
pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "nemoforge"
CI = CHART / "ci"
_spec = importlib.util.spec_from_file_location("nemoforge_chart_validate", REPO / "charts" / "validate.py")
chart_validate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chart_validate)

VALID = ["minimal-values.yaml", "full-values.yaml", "vllm-values.yaml"]
POD_KINDS = {"Deployment", "StatefulSet", "Job"}


def load_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CI / name).read_text())


def render(values: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    return chart_validate.objects(chart_validate.render(values, **kwargs))


@pytest.fixture(scope="module")
def validator() -> chart_validate.Validator:
    crds = chart_validate.default_crd_files()
    missing = [str(path) for path in crds.values() if not path.is_file()]
    if missing:
        pytest.skip(f"CRD schemas not found: {missing}")
    return chart_validate.Validator(crds)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(load_values(name)) for name in VALID}


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def pod_specs(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every workload, the InferenceService predictor included."""
    specs = [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in objs if o["kind"] in POD_KINDS]
    specs += [(o["metadata"]["name"], o["spec"]["predictor"]) for o in by_kind(objs, "InferenceService")]
    return specs


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    found = list(pod.get("containers", [])) + list(pod.get("initContainers", []))
    return found + ([pod["model"]] if "model" in pod else [])


# ----------------------------------------------------------------------------------- chart itself
def test_chart_metadata_and_files() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert re.fullmatch(r"\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", meta["version"])
    assert (CHART / "templates" / "NOTES.txt").is_file()
    images = yaml.safe_load(meta["annotations"]["images"])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert images["mlflow"] == f"{values['mlflow']['image']['repository']}:{values['mlflow']['image']['tag']}"
    assert images["mlflow"].startswith("ghcr.io/mlflow/mlflow:v3.")  # the official image, pinned


def test_schema_covers_every_value() -> None:
    """Every key in values.yaml is declared, and every declared object rejects unknown keys."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    defs = schema["$defs"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        return node

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        node = resolve(node)
        if isinstance(value, dict) and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            for key, sub in value.items():
                assert key in node["properties"], f"{path}.{key} is not in values.schema.json"
                walk(sub, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "")
    assert set(schema["properties"]) == set(values), "schema and values.yaml declare different top-level keys"


@pytest.mark.parametrize("values_file", VALID)
def test_helm_lint_strict(values_file: str) -> None:
    report = helm.lint(
        str(CHART), load_values(values_file), strict=True, namespace="kubeflow", kube_version="v1.29.0"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert not problems and not report["errors"], report


# ------------------------------------------------------------------------------------- validity
@pytest.mark.parametrize("values_file", VALID)
def test_every_rendered_object_validates(values_file: str, rendered, validator) -> None:
    objs = rendered[values_file]
    assert objs
    problems = [p for obj in objs for p in validator.errors(obj)]
    assert not problems, "\n".join(problems)


def test_validator_rejects_unknown_fields(rendered, validator) -> None:
    """The strict checks catch a misspelt field in a core object and in a custom resource."""
    objs = rendered["full-values.yaml"]
    deployment = dict(by_kind(objs, "Deployment")[0])
    deployment["spec"] = {**deployment["spec"], "replica": 2}
    assert any("'replica' was unexpected" in p for p in validator.errors(deployment))
    isvc = by_kind(objs, "InferenceService")[0]
    isvc = {**isvc, "spec": {"predictor": {**isvc["spec"]["predictor"], "minReplica": 1}}}
    assert any("'minReplica' was unexpected" in p for p in validator.errors(isvc))


@pytest.mark.parametrize(
    ("values_file", "message"),
    [
        ("invalid/five-field-cron.yaml", "at '/schedule/cron': '0 3 * * 0' does not match pattern"),
        ("invalid/plaintext-password.yaml", "at '/postgresql': additional properties 'password' not allowed"),
    ],
)
def test_invalid_values_fail_with_schema_message(values_file: str, message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        render(load_values(values_file))
    assert "values don't meet the specifications of the schema" in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mlflow": {"backendStoreSecret": {"name": "mlflow-db"}}}, "storage.bucket is required"),
        ({"storage": {"bucket": "b-1"}}, "mlflow.backendStoreSecret.name is required"),
        (
            {
                "storage": {"bucket": "b-1"},
                "mlflow": {"backendStoreSecret": {"name": "db"}},
                "postgresql": {"enabled": True, "passwordSecret": {"name": "pg"}},
            },
            "not both",
        ),
        (
            {"storage": {"bucket": "b-1"}, "postgresql": {"enabled": True}},
            "postgresql.passwordSecret.name is required",
        ),
        ({"storage": {"bucket": "b-1"}, "mlflow": {"enabled": False}}, "mlflow.externalUri is required"),
    ],
)
def test_missing_inputs_fail_with_a_named_fix(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


# -------------------------------------------------------------------------------- the schedule
def schedule_job(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (job,) = by_kind(objs, "Job")
    return job


@pytest.mark.parametrize("upgrade", [False, True])
def test_schedule_job_is_an_idempotent_post_install_upgrade_hook(upgrade: bool) -> None:
    objs = render(load_values("minimal-values.yaml"), upgrade=upgrade)
    job = schedule_job(objs)
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    # The previous Job is replaced, not duplicated, and the name does not change per revision.
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    assert job["metadata"]["name"] == "nemoforge-schedule"
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["nemoforge", "schedule", "smollm2-135m-demo"]
    flags = dict(zip(command[3:9:2], command[4:9:2], strict=True))
    assert flags == {
        "--cron": "0 0 3 * * 0",
        "--experiment": "nemoforge",
        "--host": "http://ml-pipeline.kubeflow.svc.cluster.local:8888",
    }
    sets = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
    assert "tracking.mlflow_uri=http://nemoforge-mlflow.kubeflow.svc.cluster.local:5000" in sets
    assert "storage.artifact_root=s3://nemoforge-artifacts-123456789012/nemoforge" in sets


def test_schedule_with_custom_recipe_and_multi_user(rendered) -> None:
    objs = rendered["full-values.yaml"]
    job = schedule_job(objs)
    pod = job["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[2] == "/etc/nemoforge/recipe.yaml"
    assert command[command.index("--namespace") + 1] == "kubeflow"
    assert command[command.index("--cron") + 1] == "0 30 2 * * 1-5"
    (recipe_cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"] == "nemoforge-recipe"]
    assert yaml.safe_load(recipe_cm["data"]["recipe.yaml"])["name"] == "llama-3-1-8b-weekly"
    (token,) = [v for v in pod["volumes"] if v["name"] == "kfp-token"]
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["kfp-token"] == "/var/run/secrets/kubeflow/pipelines"


# -------------------------------------------------------------------------------------- security
SENSITIVE_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|BACKEND_STORE_URI|DSN", re.IGNORECASE)
CREDENTIALS_IN_URL = re.compile(r"://[^/\s:@$]+:(?!\$\()[^/\s@]+@")


@pytest.mark.parametrize("values_file", VALID)
def test_no_plaintext_secrets(values_file: str, rendered) -> None:
    objs = rendered[values_file]
    assert not by_kind(objs, "Secret"), "the chart must only refer to existing Secrets"
    text = yaml.safe_dump_all(objs)
    assert not CREDENTIALS_IN_URL.search(text), "a user:password@ URL is rendered in plain text"
    for name, pod in pod_specs(objs):
        for container in containers(pod):
            for env in container.get("env", []):
                if SENSITIVE_ENV.search(env["name"]):
                    ok = "secretKeyRef" in env.get("valueFrom", {}) or re.fullmatch(
                        r"[^$]*\$\(POSTGRES_PASSWORD\)[^$]*", env.get("value", "")
                    )
                    assert ok, f"{name}/{container['name']}: {env['name']} is not from a Secret"


@pytest.mark.parametrize("values_file", VALID)
def test_pods_run_as_non_root(values_file: str, rendered) -> None:
    specs = pod_specs(rendered[values_file])
    assert specs
    for name, pod in specs:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        for container in containers(pod):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert context["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            assert context["readOnlyRootFilesystem"] is True, (name, container["name"])


@pytest.mark.parametrize("values_file", VALID)
def test_servers_have_probes_and_resources(values_file: str, rendered) -> None:
    objs = rendered[values_file]
    for name, pod in pod_specs(objs):
        for container in containers(pod):
            assert container["resources"]["requests"] and container["resources"]["limits"], (
                name,
                container["name"],
            )
    servers = [(n, p) for n, p in pod_specs(objs) if not n.endswith("-schedule")]
    assert servers
    for name, pod in servers:
        main = pod["model"] if "model" in pod else pod["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in main, f"{name} has no {probe}"


def test_rbac_is_namespaced_and_least_privilege(rendered) -> None:
    objs = rendered["full-values.yaml"]
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")
    roles = {o["metadata"]["name"]: o["rules"] for o in by_kind(objs, "Role")}
    for rules in roles.values():
        for rule in rules:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
    workloads = {
        (g, r) for rule in roles["nemoforge-workloads"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert {("trainer.kubeflow.org", "trainjobs"), ("serving.kserve.io", "inferenceservices")} <= workloads
    scheduler = {r for rule in roles["nemoforge-scheduler"] for r in rule["resources"]}
    assert {"pipelines", "experiments", "jobs", "runs"} <= scheduler
    bindings = {
        o["metadata"]["name"]: {s["name"] for s in o["subjects"]} for o in by_kind(objs, "RoleBinding")
    }
    assert bindings["nemoforge-workloads"] == {"nemoforge", "default-editor", "pipeline-runner"}
    assert bindings["nemoforge-scheduler"] == {"nemoforge"}


def test_service_account_carries_the_cloud_identity(rendered) -> None:
    (sa,) = by_kind(rendered["full-values.yaml"], "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for name, pod in pod_specs(rendered["full-values.yaml"]):
        assert pod["serviceAccountName"] == "nemoforge", name


# ------------------------------------------------------------------------------- MLflow, storage
def mlflow_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [o for o in by_kind(objs, "Deployment") if o["metadata"]["name"] == "nemoforge-mlflow"]
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_mlflow_server_flags(rendered) -> None:
    container = mlflow_container(rendered["minimal-values.yaml"])
    assert container["image"] == "ghcr.io/mlflow/mlflow:v3.17.2-full"
    args = dict(a.split("=", 1) for a in container["command"][2:] if "=" in a)
    assert args["--artifacts-destination"] == "s3://nemoforge-artifacts-123456789012/mlflow"
    assert "--default-artifact-root" not in args  # proxied artifacts only (platform.md §4.6)
    hosts = args["--allowed-hosts"].split(",")
    assert {"nemoforge-mlflow.kubeflow.svc.cluster.local:*", "nemoforge-mlflow:*", "localhost:*"} <= set(
        hosts
    )
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "dsn"}
    full = mlflow_container(rendered["full-values.yaml"])
    full_args = dict(a.split("=", 1) for a in full["command"][2:] if "=" in a)
    assert "mlflow.example.com" in full_args["--allowed-hosts"].split(",")
    assert full_args["--cors-allowed-origins"] == "https://mlflow.example.com"


def test_in_chart_postgresql(rendered) -> None:
    objs = rendered["full-values.yaml"]
    (sts,) = by_kind(objs, "StatefulSet")
    env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-postgres"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "50Gi"
    dsn = {e["name"]: e for e in mlflow_container(objs)["env"]}["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert dsn == "postgresql+psycopg2://mlflow:$(POSTGRES_PASSWORD)@nemoforge-postgresql:5432/mlflow"


def test_kfp_launcher_configmap(rendered) -> None:
    (minimal,) = [o for o in by_kind(rendered["minimal-values.yaml"], "ConfigMap")]
    assert minimal["metadata"]["name"] == "kfp-launcher"
    assert minimal["data"]["defaultPipelineRoot"] == "s3://nemoforge-artifacts-123456789012/kfp"
    s3 = yaml.safe_load(minimal["data"]["providers"])["s3"]["default"]
    assert s3 == {
        "endpoint": "s3.us-east-1.amazonaws.com",
        "region": "us-east-1",
        "disableSSL": False,
        "forcePathStyle": False,
        "credentials": {"fromEnv": True},
    }
    (full,) = [
        o
        for o in by_kind(rendered["full-values.yaml"], "ConfigMap")
        if o["metadata"]["name"] == "kfp-launcher"
    ]
    s3 = yaml.safe_load(full["data"]["providers"])["s3"]["default"]
    assert s3["endpoint"] == "minio.minio.svc.cluster.local:9000" and s3["disableSSL"] is True
    assert s3["credentials"]["secretRef"]["secretName"] == "minio-keys"
    assert not [o for o in rendered["vllm-values.yaml"] if o["metadata"]["name"] == "kfp-launcher"]


# ------------------------------------------------------------------------------------- serving
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}


def verify_remote_code_container(champion_dir: str, repository: str) -> dict[str, Any]:
    """The init container that refuses a champion whose Python files are not the ones nemoforge ships."""
    return {
        "name": "verify-remote-code",
        "image": f"{repository}:0.1.0",
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "nemoforge.models.remote_code", champion_dir],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "volumeMounts": [
            {"name": "champion", "mountPath": "/mnt/champion", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def test_kserve_serving_of_the_champion(rendered) -> None:
    (isvc,) = by_kind(rendered["full-values.yaml"], "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert predictor["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert GPU_TOLERATION in predictor["tolerations"]
    fetch, verify = predictor["initContainers"]
    assert fetch["command"][:3] == ["mlflow", "artifacts", "download"]
    assert verify == verify_remote_code_container("/mnt/champion", "registry.example.com/nemoforge/nemoforge")
    assert "models:/llama-3-1-8b-child@champion" in fetch["command"]
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "huggingface"}
    assert "storageUri" not in model
    for arg in (
        "--backend=vllm",
        "--model_name=nemotron-8b",
        "--model_dir=/mnt/champion",
        "--tensor_parallel_size=2",
        "--trust_remote_code",
        "--reasoning-parser=deepseek_r1",
    ):
        assert arg in model["args"], arg
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_kserve_from_a_storage_uri(validator) -> None:
    values = load_values("full-values.yaml")
    values["serving"]["storageUri"] = "s3://nemoforge-artifacts-123456789012/models/champion"
    (isvc,) = by_kind(render(values), "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert "initContainers" not in predictor
    assert predictor["model"]["storageUri"] == values["serving"]["storageUri"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/s3-usehttps"] == "0"
    assert not validator.errors(isvc)


def test_vllm_deployment_when_kserve_is_absent(rendered) -> None:
    objs = rendered["vllm-values.yaml"]
    assert not by_kind(objs, "InferenceService")
    (deployment,) = by_kind(objs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert GPU_TOLERATION in pod["tolerations"]
    vllm = pod["containers"][0]
    assert vllm["command"] == ["vllm", "serve"]
    assert vllm["args"][0] == "/mnt/champion/model"
    assert "--served-model-name=smollm2-135m-child" in vllm["args"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["initContainers"][1] == verify_remote_code_container("/mnt/champion/model", "ghcr.io/nemoforge/nemoforge")
    fetch_env = {e["name"]: e.get("value") for e in pod["initContainers"][0]["env"]}
    assert fetch_env["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
    (service,) = [o for o in by_kind(objs, "Service") if o["metadata"]["name"] == "nemoforge-serving"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
