"""Lineage against a real MLflow tracking store and registry (SQLite, one file for this module)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from nemoforge import lineage
from nemoforge.config import Recipe
from nemoforge.errors import InputNotFoundError
from nemoforge.stages.result import DatasetRef, StageResult

DIGEST = "ab" * 32  # a sha256 hex


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir}/mlflow.db"  # schema created once for the module (~2 s)


@pytest.fixture
def experiment() -> str:
    return f"exp-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def recipe() -> Recipe:
    return Recipe(name="lineage-test")


@pytest.fixture
def client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _model_dir(root: Path, name: str) -> str:
    path = root / name
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return str(path)


def _nas_result(workdir: Path, model_uri: str) -> StageResult:
    plot = workdir / f"loss-{uuid.uuid4().hex[:6]}.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n")
    return StageResult(
        metrics={"kl_div_heldout": 0.25, "params": 1.0e6},
        history={"loss": [(1, 3.0), (2, 2.5), (3, 2.0)]},
        outputs={"model": model_uri},
        digests={"model": DIGEST},
        plots={"loss_curve": str(plot)},
        datasets=[DatasetRef("corpus-train", "s3://bucket/corpus/train.pt", DIGEST, num_rows=40)],
        tags={"block_configs": "attn: 4/4, ffn: 3/4"},
    )


# ----------------------------------------------------------------------------------------------- runs
def test_stage_runs_nest_under_the_pipeline_run(
    tracking_uri: str, experiment: str, recipe: Recipe, client: MlflowClient, workdir: Path
) -> None:
    model_uri = _model_dir(workdir, f"nas-{experiment}")
    with lineage.Lineage(tracking_uri, experiment).stage_run(
        "run-1", "nas", recipe, input_uris={"parent_uri": "/models/parent"}
    ) as tracker:
        tracker.log_metrics(1, {"loss": 3.0})  # live, then again in the result's history
        tracker.log_result(_nas_result(workdir, model_uri))
    with lineage.Lineage(tracking_uri, experiment).stage_run(
        "run-1", "distill", recipe, input_uris={"model_uri": model_uri}
    ) as distill:
        distill.log_result(StageResult(metrics={"loss": 1.5}))
    lineage.Lineage(tracking_uri, experiment).finish_pipeline_run("run-1", "FINISHED")

    nas = client.get_run(tracker.run_id)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.run_name == "run-1"
    assert parent.data.tags["nemoforge.pipeline_run"] == "run-1"
    assert parent.info.status == "FINISHED"
    assert nas.info.run_name == "nas"
    assert nas.info.status == "FINISHED"
    assert nas.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_run(distill.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_run(distill.run_id).info.status == "FINISHED"
    assert client.get_experiment(nas.info.experiment_id).artifact_location.endswith(str(workdir / "mlruns"))

    # resolved recipe, settings and inputs
    recipe_path = client.download_artifacts(nas.info.run_id, "recipe.json", str(workdir / uuid.uuid4().hex))
    assert json.loads(Path(recipe_path).read_text()) == recipe.model_dump(mode="json")
    assert nas.data.params["nas.bld.steps"] == str(recipe.nas.bld.steps)
    assert nas.data.params["nas.ffn_intermediate_sizes"] == json.dumps(recipe.nas.ffn_intermediate_sizes)
    assert nas.data.params["data.seq_len_tokens"] == str(recipe.data.seq_len_tokens)
    assert nas.data.params["input.parent_uri"] == "/models/parent"
    assert "distill.steps" not in nas.data.params

    # metrics with steps (the live point is not doubled), final metrics
    history = client.get_metric_history(nas.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert nas.data.metrics["kl_div_heldout"] == 0.25
    assert "wall_time_s" in nas.data.metrics

    # the dataset with our digest and source URI
    (dataset_input,) = nas.inputs.dataset_inputs
    assert dataset_input.dataset.name == "corpus-train"
    assert dataset_input.dataset.digest == DIGEST[: lineage.MAX_DATASET_DIGEST_CHARS]
    assert json.loads(dataset_input.dataset.source) == {"uri": "s3://bucket/corpus/train.pt"}
    input_tags = {t.key: t.value for t in dataset_input.tags}
    assert input_tags == {
        "mlflow.data.context": "training",
        "nemoforge.num_rows": "40",
        "nemoforge.sha256": DIGEST,
    }

    # plots, outputs and the output model (external: the weights are not copied)
    assert [f.path for f in client.list_artifacts(nas.info.run_id, "plots")] == ["plots/loss_curve.png"]
    assert nas.data.tags["nemoforge.output.model"] == model_uri
    assert nas.data.tags["nemoforge.digest.model"] == DIGEST
    assert nas.data.tags["block_configs"] == "attn: 4/4, ffn: 3/4"
    (output,) = nas.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.tags["nemoforge.model_uri"] == model_uri
    assert model.source_run_id == nas.info.run_id
    assert model.tags["mlflow.model.isExternal"] == "true"
    assert {m.key: m.value for m in model.metrics} == {"kl_div_heldout": 0.25, "params": 1.0e6}
    # distill read that model: linked as its model input
    assert [m.model_id for m in client.get_run(distill.run_id).inputs.model_inputs] == [model.model_id]


def test_rerun_after_failure_restarts_the_same_run(
    tracking_uri: str, experiment: str, recipe: Recipe, client: MlflowClient
) -> None:
    with (
        pytest.raises(RuntimeError, match="out of memory"),
        lineage.Lineage(tracking_uri, experiment).stage_run("run-2", "nas", recipe) as first,
    ):
        first.log_metrics(1, {"loss": 4.0})
        raise RuntimeError("out of memory\nat step 2")
    failed = client.get_run(first.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["nemoforge.error"] == "RuntimeError: out of memory at step 2"
    assert (
        lineage.pipeline_status(lineage.Lineage(tracking_uri, experiment))[0]["error"]
        == "RuntimeError: out of memory at step 2"
    )

    for _ in range(2):  # a re-run, then a reuse that logs the same result again
        with lineage.Lineage(tracking_uri, experiment).stage_run("run-2", "nas", recipe) as again:
            again.log_result(
                StageResult(
                    metrics={"kl_div_heldout": 0.5},
                    history={"loss": [(1, 4.0), (2, 3.0)]},
                    datasets=[DatasetRef("corpus-heldout", "teacher://parent", DIGEST, 8, "validation")],
                )
            )
    assert again.run_id == first.run_id
    rerun = client.get_run(again.run_id)
    assert rerun.info.status == "FINISHED"
    assert rerun.data.tags["nemoforge.attempts"] == "3"
    assert "nemoforge.error" not in rerun.data.tags
    loss = client.get_metric_history(again.run_id, "loss")
    assert [(m.step, m.value) for m in loss] == [(1, 4.0), (2, 3.0)]
    (dataset_input,) = rerun.inputs.dataset_inputs  # logged twice, recorded once
    assert dataset_input.dataset.source_type == "uri"
    assert json.loads(dataset_input.dataset.source) == {"uri": "teacher://parent"}
    assert len(client.search_runs([rerun.info.experiment_id])) == 2  # one parent, one stage run

    # changed settings cannot overwrite MLflow params: a new stage run, which status then shows
    changed = recipe.model_copy(update={"nas": recipe.nas.model_copy(update={"num_solutions": 5})})
    with lineage.Lineage(tracking_uri, experiment).stage_run("run-2", "nas", changed) as other:
        pass
    assert other.run_id != first.run_id
    assert [
        s["run_id"] for s in lineage.pipeline_status(lineage.Lineage(tracking_uri, experiment), "run-2")
    ] == [other.run_id]


def test_interrupt_marks_the_stage_killed(
    tracking_uri: str, experiment: str, recipe: Recipe, client: MlflowClient
) -> None:
    with (
        pytest.raises(KeyboardInterrupt),
        lineage.Lineage(tracking_uri, experiment).stage_run("run-3", "cpt", recipe) as tracker,
    ):
        raise KeyboardInterrupt
    assert client.get_run(tracker.run_id).info.status == "KILLED"


def test_pipeline_status_lists_stages_in_order(
    tracking_uri: str, experiment: str, recipe: Recipe, workdir: Path
) -> None:
    assert lineage.pipeline_status(lineage.Lineage(tracking_uri, experiment)) == []
    model_uri = _model_dir(workdir, f"status-{experiment}")
    for stage in ("distill", "nas"):  # started out of order on purpose
        with lineage.Lineage(tracking_uri, experiment).stage_run("old", stage, recipe) as tracker:
            tracker.log_result(StageResult(metrics={"loss": 1.0}, outputs={"model": f"{model_uri}/{stage}"}))
    time.sleep(0.01)
    with (
        pytest.raises(ValueError, match="boom"),
        lineage.Lineage(tracking_uri, experiment).stage_run("new", "nas", recipe),
    ):
        raise ValueError("boom")

    (latest,) = lineage.pipeline_status(lineage.Lineage(tracking_uri, experiment))  # the newest pipeline run
    assert latest["pipeline_run"] == "new"
    assert latest["pipeline_state"] == "RUNNING"
    assert latest["state"] == "FAILED"
    assert latest["error"] == "ValueError: boom"

    old = lineage.pipeline_status(lineage.Lineage(tracking_uri, experiment), "old")
    assert [s["stage"] for s in old] == ["nas", "distill"]
    nas = old[0]
    assert nas["state"] == "FINISHED"
    assert nas["outputs"] == {"model": f"{model_uri}/nas"}
    assert nas["metrics"]["loss"] == 1.0
    assert nas["error"] is None
    assert nas["reused"] is False
    assert 0 <= nas["wall_time_s"] < 60
    assert nas["start_time"] <= nas["end_time"]
    with pytest.raises(InputNotFoundError, match="no pipeline run 'missing'"):
        lineage.pipeline_status(lineage.Lineage(tracking_uri, experiment), "missing")
    with pytest.raises(InputNotFoundError, match="no pipeline run 'missing'"):
        lineage.Lineage(tracking_uri, experiment).finish_pipeline_run("missing", "FAILED")


def test_plots_on_s3_are_fetched_through_the_recipe_store(
    tracking_uri: str, experiment: str, client: MlflowClient, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("NEMOFORGE_CACHE", str(workdir / "cache"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="plots")
        s3.put_object(Bucket="plots", Key="run/nas/pareto.png", Body=b"\x89PNG\r\n\x1a\n")
        storage = {"artifact_root": "s3://plots/run", "s3_endpoint_url": endpoint}
        recipe = Recipe(name="s3-test", storage=storage)
        with lineage.Lineage(tracking_uri, experiment).stage_run("run-s3", "nas", recipe) as tracker:
            tracker.log_result(StageResult(plots={"pareto_front": "s3://plots/run/nas/pareto.png"}))
    finally:
        server.stop()
    assert [f.path for f in client.list_artifacts(tracker.run_id, "plots")] == ["plots/pareto_front.png"]


# ------------------------------------------------------------------------------------------ registry
def test_register_model_points_aliases_at_the_store_uri(
    tracking_uri: str, experiment: str, recipe: Recipe, client: MlflowClient, workdir: Path
) -> None:
    model_uri = _model_dir(workdir, f"reg-{experiment}")
    with lineage.Lineage(tracking_uri, experiment).stage_run("run-4", "cpt", recipe) as tracker:
        tracker.log_result(StageResult(outputs={"model": model_uri}, digests={"model": DIGEST}))
    name = f"child-{experiment}"

    first = lineage.Registry(tracking_uri).register_model(
        name, model_uri, aliases=["challenger"], tags={"gate": "pending"}
    )
    version = client.get_model_version_by_alias(name, "challenger")
    assert int(version.version) == first == 1
    assert version.source == model_uri  # registered in place, nothing copied
    assert version.run_id == tracker.run_id
    assert version.tags["nemoforge.sha256"] == DIGEST
    assert version.tags["gate"] == "pending"

    second = lineage.Registry(tracking_uri).register_model(
        name, model_uri, aliases=["challenger", "champion"]
    )
    assert second == 2
    assert int(client.get_model_version_by_alias(name, "champion").version) == 2
    assert int(client.get_model_version_by_alias(name, "challenger").version) == 2

    external = lineage.Registry(tracking_uri).register_model(name, "s3://bucket/models/x")
    assert client.get_model_version(name, str(external)).source == "s3://bucket/models/x"
    with pytest.raises(InputNotFoundError, match="does not exist"):
        lineage.Registry(tracking_uri).register_model(name, str(workdir / "no-such-model"))


# ------------------------------------------------------------------------------------- experiments
def test_ensure_experiment(tracking_uri: str, experiment: str, workdir: Path) -> None:
    exp_id = lineage.Lineage(tracking_uri, experiment).ensure_experiment(str(workdir / "elsewhere"))
    assert lineage.Lineage(tracking_uri, experiment).ensure_experiment() == exp_id
