"""No secret in lineage, logs or manifests (issue 16 §4).

Three marker values stand in for the credentials a nemoforge pod holds: the S3 secret key, the
Kubernetes token of the TrainJob launcher and the MLflow token. A run with them in the environment
(the S3 key really signs every store request, against moto's S3 server) must leave them in no MLflow
param, tag, metric name or artifact, no task log, no file of the workdir and no object of the store;
no manifest rendered with them in the environment may carry them, and every secret-named variable in
a manifest must come from a Secret by reference.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import moto_s3
from test_pipeline import _tiny_args

from nemoforge.config import builtin_recipes, load_recipe
from nemoforge.errors import RecipeError

REPO = Path(__file__).resolve().parents[1]
MARKERS = {
    "AWS_SECRET_ACCESS_KEY": "nfmarker-aws-7f3c2a",
    "NEMOFORGE_KUBE_TOKEN": "nfmarker-kube-91d2e4",
    "MLFLOW_TRACKING_TOKEN": "nfmarker-mlflow-4be8c1",
}
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY")


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in MARKERS.items():
        monkeypatch.setenv(name, value)


def leaked(data: str | bytes, where: str) -> list[str]:
    """``"<variable> in <where>"`` for each marker found in ``data``."""
    raw = data.encode() if isinstance(data, str) else data
    return [f"{name} in {where}" for name, value in MARKERS.items() if value.encode() in raw]


def env_entries(obj: Any) -> Iterator[dict[str, Any]]:
    """Every ``{"name", "value"|"valueFrom"}`` entry of every ``env`` list anywhere in a manifest."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "env" and isinstance(value, list):
                yield from (e for e in value if isinstance(e, dict) and "name" in e)
            else:
                yield from env_entries(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from env_entries(item)


def plain_secrets(objs: list[dict[str, Any]], where: str) -> list[str]:
    """Secret-named variables given as a literal value instead of ``valueFrom`` a Secret."""
    return [f"{e['name']} in {where}" for o in objs for e in env_entries(o)
            if SECRET_NAME.search(e["name"]) and "valueFrom" not in e]  # fmt: skip


# ----------------------------------------------------------------------------------- recipe
def test_recipe_refuses_credentials_in_uris():
    with pytest.raises(RecipeError) as err:
        load_recipe(
            "smollm2-135m-demo",
            ["tracking.mlflow_uri=https://bob:hunter2@mlflow.example", "storage.s3_endpoint_url=http://AKIA1@minio:9000"],
        )
    message = str(err.value)
    assert "tracking.mlflow_uri, storage.s3_endpoint_url: credentials in a URI" in message
    assert "MLFLOW_TRACKING_TOKEN" in message and "hunter2" not in message and "AKIA1" not in message
    assert len(message.splitlines()) == 1
    ok = load_recipe("smollm2-135m-demo", ["tracking.mlflow_uri=http://mlflow:5000", "data.corpus_uri=hf://a/b@main"])
    assert ok.data.corpus_uri == "hf://a/b@main"


# -------------------------------------------------------------------------------- manifests
def test_manifests_carry_no_secret_and_refer_to_secrets(secret_env, tmp_path: Path):
    """Pipeline YAML of every built-in recipe, TrainJobs, serving manifests and the chart's output."""
    from nemoforge.cluster.trainjob import build_trainjob
    from nemoforge.serving import manifests
    from nemoforge_pipelines import compile_recipe

    found: list[str] = []
    for name in builtin_recipes():
        text = compile_recipe(load_recipe(name), tmp_path / f"{name}.yaml").read_text()
        found += leaked(text, f"pipeline {name}") + plain_secrets(list(yaml.safe_load_all(text)), f"pipeline {name}")
    recipe = load_recipe("llama-3.3-70b-super")
    inputs = {"model": {"uri": "s3://b/m", "digest": "d"}, "corpus": {"uri": "s3://b/c", "digest": "e"}}
    for stage in ("distill", "cpt"):
        job = build_trainjob(recipe, stage, "run-1", inputs, image="img:1", namespace="ns")
        found += leaked(yaml.safe_dump(job), f"TrainJob {stage}") + plain_secrets([job], f"TrainJob {stage}")
    serving = [manifests.inferenceservice(recipe, "s3://b/m", image="img:1"),
               *manifests.deployment(recipe, "s3://b/m", image="img:1")]  # fmt: skip
    found += leaked(manifests.to_yaml(serving), "serving manifests") + plain_secrets(serving, "serving manifests")

    pytest.importorskip("helm_python", reason="pip install helm-python-sdk")
    spec = importlib.util.spec_from_file_location("nemoforge_chart_validate", REPO / "charts" / "validate.py")
    chart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chart)
    for values_file in sorted((REPO / "charts" / "nemoforge" / "ci").glob("*-values.yaml")):
        rendered = chart.render(yaml.safe_load(values_file.read_text()))
        objs = chart.objects(rendered)
        found += leaked("".join(rendered.values()), f"chart {values_file.name}")
        found += plain_secrets(objs, f"chart {values_file.name}")
        if values_file.name == "full-values.yaml":  # static S3 keys: present, and by reference
            refs = [e for o in objs for e in env_entries(o) if e["name"] == "AWS_SECRET_ACCESS_KEY"]
            assert refs and all(e["valueFrom"]["secretKeyRef"]["name"] == "minio-keys" for e in refs)
    assert found == [], "\n".join(found)


# -------------------------------------------------------------------------------- a real run
@pytest.fixture
def s3_endpoint(secret_env) -> Iterator[str]:
    """moto's S3 server in this process; the marker is the secret key every request is signed with."""
    with moto_s3(MARKERS["AWS_SECRET_ACCESS_KEY"]) as endpoint:
        yield endpoint


@pytest.mark.slow
def test_run_leaves_no_secret_in_lineage_logs_or_store(
    s3_endpoint: str, tiny_llama_dir: Path, shared_dir: Path, tmp_path: Path, capfd
):
    """parent, corpus and cpt (2 steps) under kfp.local through the CLI, store on S3, MLflow on SQLite."""
    import boto3
    from mlflow import MlflowClient

    from nemoforge_cli.main import main

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="nf-secrets")
    workdir = tmp_path / "work"
    corpus = shared_dir / "data" / "corpus" / "tinyshakespeare.txt"
    args = _tiny_args(tiny_llama_dir, corpus, workdir, "nas.enabled=false", "distill.enabled=false", "cpt.steps=2",
                      "storage.artifact_root=s3://nf-secrets/runs", f"storage.s3_endpoint_url={s3_endpoint}")
    args.remove("--quiet")  # the task logs are under test
    assert main(args) == 0
    out, err = capfd.readouterr()
    assert "cpt" in out + err
    found = leaked(out + err, "console")
    assert "Streamed logs" in (next((workdir / "logs").iterdir()) / "cpt.log").read_text()  # below: every file

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("nemoforge").experiment_id])
    assert {r.info.run_name for r in runs} >= {"cpt"}
    for run in runs:
        where = f"MLflow run {run.info.run_name}"
        found += leaked(repr(run.data.params), f"{where} params") + leaked(repr(run.data.tags), f"{where} tags")
        found += leaked(" ".join(run.data.metrics), f"{where} metric names")
    artifacts = [p for p in (workdir / "mlruns").rglob("*") if p.is_file()]
    assert any(p.name == "recipe.json" for p in artifacts)
    files = [p for p in workdir.rglob("*") if p.is_file()]  # mlflow.db, mlruns/ artifacts, kfp/ task outputs
    assert set(artifacts) <= set(files)
    found += [f for p in files for f in leaked(p.read_bytes(), str(p.relative_to(workdir)))]

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="nf-secrets").get("Contents", [])]
    assert any(k.endswith("model.safetensors") for k in keys)
    for key in keys:
        found += leaked(s3.get_object(Bucket="nf-secrets", Key=key)["Body"].read(), f"s3://nf-secrets/{key}")
    assert found == [], "\n".join(found)
