"""The promotion gate's outcome recorded in the MLflow registry: challenger always, champion only on a pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nemoforge.config import Recipe
from nemoforge.stages.result import StageResult


def _result(tmp_path: Path, model_dir: Path, name: str, gate: str, pass1: float) -> StageResult:
    out = tmp_path / "store" / name / "eval"
    return StageResult(
        metrics={"math_pass1_on": pass1, "decode_tokens_per_s": 10.0},
        outputs={"model": str(model_dir), "registration": str(out / "registration.json")},
        digests={"model": "abc"},
        tags={"gate": gate, "gate_checks": f"{'ok' if gate == 'passed' else 'fail'}: math_pass1_on",
              "eval_settings": f"settings-of-{name}"},
    )


def test_register_moves_champion_only_when_the_gate_passed(tiny_llama_dir: Path, tmp_path: Path):
    from mlflow import MlflowClient

    from nemoforge.runner.register import champion_record, register_evaluated_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = Recipe(name="test", tracking={"mlflow_uri": uri}, storage={"artifact_root": str(tmp_path / "store")})
    inputs = {"model": {"uri": "/m/rl", "digest": "d"}, "parent": {"uri": "/m/parent", "digest": "p"}}

    first = register_evaluated_model(recipe, "run-1", _result(tmp_path, tiny_llama_dir, "run-1", "passed", 0.5), inputs)
    assert first["version"] == 1 and first["aliases"] == ["challenger", "champion"]
    again = register_evaluated_model(recipe, "run-1", _result(tmp_path, tiny_llama_dir, "run-1", "passed", 0.5), inputs)
    assert again["version"] == 1  # a reused eval result is registered once

    second = register_evaluated_model(recipe, "run-2", _result(tmp_path, tiny_llama_dir, "run-2", "failed", 0.1), inputs)
    assert second["version"] == 2 and second["gate"] == "failed"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = recipe.model.name
    assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    assert int(client.get_model_version_by_alias(name, "challenger").version) == 2
    tags = client.get_model_version(name, "2").tags
    assert tags["nemoforge.gate"] == "failed" and tags["nemoforge.pipeline_run"] == "run-2"
    assert tags["nemoforge.upstream.model"] == "/m/rl" and tags["nemoforge.metric.math_pass1_on"] == "0.1"
    assert tags["nemoforge.eval_settings"] == "settings-of-run-2"

    # the registry is the champion's one record: the failed run-2 left it where it was
    record = champion_record(recipe)
    assert record == {
        "version": 1, "model_uri": str(tiny_llama_dir.resolve()),
        "metrics": {"math_pass1_on": 0.5, "decode_tokens_per_s": 10.0}, "eval_settings": "settings-of-run-1",
    }
    assert not (tmp_path / "store" / "registry").exists()  # no second record in the store


def test_status_names_every_failed_gate_criterion(tmp_path: Path, capsys):
    from nemoforge import lineage
    from nemoforge_cli.main import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = Recipe(name="test", tracking={"mlflow_uri": uri})
    checks = [
        "fail: retention math_pass1_on=0 >= 0.8 (child 0, parent 0.042)",
        "ok: decode speedup=1.45 (95% CI 1.38 to 1.52) >= 1.3",
        "fail: toggle_on=0.125 (95% CI 0.04 to 0.31) >= 0.9",
        "ok: no champion yet",
    ]
    with lineage.Lineage(uri, "nemoforge").stage_run("run-1", "eval", recipe) as tracker:
        tracker.log_result(StageResult(metrics={"gate_passed": 0.0, "toggle_on": 0.125, "toggle_on_ci_low": 0.04},
                                       tags={"gate": "failed", "gate_checks": "; ".join(checks)}))
    (status,) = lineage.pipeline_status(lineage.Lineage(uri, "nemoforge"))
    assert status["gate"] == "failed"
    assert status["gate_failed"] == [
        "retention math_pass1_on=0 >= 0.8 (child 0, parent 0.042)", "toggle_on=0.125 (95% CI 0.04 to 0.31) >= 0.9"
    ]
    capsys.readouterr()
    assert main(["status", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gate failed" in out and "toggle_on_ci_low" not in out  # intervals stay out of the key metrics
    assert "- retention math_pass1_on=0 >= 0.8 (child 0, parent 0.042)" in out
    assert "- toggle_on=0.125 (95% CI 0.04 to 0.31) >= 0.9" in out


def test_status_lists_the_gate_metrics_first_and_fits_the_terminal(tmp_path: Path, capsys, monkeypatch):
    from nemoforge import lineage
    from nemoforge.stages.result import key_metrics
    from nemoforge_cli.main import main

    metrics = {"decode_tokens_per_s": 9.0, "ifeval_prompt_strict": 0.3, "kl_to_parent": 0.1, "lm_loss": 2.0,
               "lm_top1": 0.4, "math_pass1_off": 0.2, "math_pass1_on": 0.25, "parent_lm_top1": 0.45,
               "speedup": 1.4, "speedup_ci_low": 1.3, "toggle_off": 0.95, "toggle_on": 0.9}
    assert [k for k, _ in key_metrics("eval", metrics, 8)] == [
        "toggle_on", "toggle_off", "math_pass1_on", "math_pass1_off", "speedup",
        "decode_tokens_per_s", "ifeval_prompt_strict", "kl_to_parent",
    ]
    assert [k for k, _ in key_metrics("cpt", {"b": 1.0, "a": 2.0}, 8)] == ["a", "b"]
    assert [k for k, _ in key_metrics("eval", metrics, 4, key_only=True)] == [  # the line eval prints as it ends
        "toggle_on", "toggle_off", "math_pass1_on", "math_pass1_off"]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = Recipe(name="test", tracking={"mlflow_uri": uri})
    with lineage.Lineage(uri, "nemoforge").stage_run("run-1", "eval", recipe) as t:
        t.log_result(StageResult(metrics=metrics, outputs={"model": f"{tmp_path}/store/run-1/rl/model"}))
    monkeypatch.setenv("COLUMNS", "90")
    capsys.readouterr()
    assert main(["status", "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 90
    assert "toggle_on=0.9" in "".join(lines)


def _finished_run_with_champion(tmp_path: Path, model_dir: Path) -> tuple[Recipe, Any]:
    """Pipeline run ``run-1``, FINISHED: retrained (no champion yet), eval passed, v1 registered as champion."""
    from nemoforge import lineage
    from nemoforge.runner.register import register_evaluated_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = Recipe(name="test", tracking={"mlflow_uri": uri}, storage={"artifact_root": str(tmp_path / "store")})
    runs = lineage.Lineage(uri, "nemoforge")
    runs.open_pipeline_run("run-1", recipe)
    runs.set_pipeline_tags("run-1", {lineage.TAG_OUTCOME: "retrain", "nemoforge.outcome_reason": "no champion yet",
                                     f"{lineage.TAG_INPUT_DIGEST}corpus": "c" * 64})
    with runs.stage_run("run-1", "eval", recipe) as tracker:
        tracker.log_result(StageResult(metrics={"speedup": 1.5, "toggle_on": 1.0, "a_metric": 0.0},
                                       tags={"gate": "passed", "gate_checks": "ok: all"}))
    inputs = {"model": {"uri": "/m/rl", "digest": "d"}, "parent": {"uri": "/m/parent", "digest": "p"}}
    register_evaluated_model(recipe, "run-1", _result(tmp_path, model_dir, "run-1", "passed", 0.5), inputs)
    runs.finish_pipeline_run("run-1", "FINISHED")
    return recipe, runs


def _skipped_run(runs: Any, recipe: Recipe) -> str:
    """Pipeline run ``run-2``, FINISHED: its check-inputs step found the inputs unchanged since run-1's champion and
    skipped the rest; the reason."""
    from nemoforge import lineage

    reason = f"inputs unchanged since champion {recipe.model.name} v1 (pipeline run run-1)"
    with runs.stage_run("run-2", "check-inputs", recipe):
        runs.set_pipeline_tags("run-2", {lineage.TAG_OUTCOME: "skipped", "nemoforge.outcome_reason": reason})
    runs.finish_pipeline_run("run-2", "FINISHED")
    return reason


def test_status_heads_with_the_runs_outcome_inputs_and_champion_also_after_a_skip(
    tiny_llama_dir: Path, tmp_path: Path, capsys, monkeypatch
):
    from nemoforge_cli.main import main

    monkeypatch.setenv("COLUMNS", "160")
    recipe, runs = _finished_run_with_champion(tmp_path, tiny_llama_dir)
    capsys.readouterr()
    assert main(["status", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pipeline run run-1: FINISHED, retrain: no champion yet\ninputs: corpus cccccccccccc\n")
    assert f"champion: {recipe.model.name} v1 (pipeline run run-1; models:/{recipe.model.name}@champion)" in out
    assert out.index("toggle_on=1") < out.index("speedup=1.5") < out.index("a_metric=0")  # the stage's figures first

    reason = _skipped_run(runs, recipe)
    assert main(["status", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"pipeline run run-2: FINISHED, skipped: {reason}\n")
    assert "no stage ran in this pipeline run (skipped)" in out and "champion: " in out
    assert "│ check-inputs │ FINISHED" in out  # the step that decided, in the table


def test_status_json_heads_with_what_the_text_says_above_the_table(tiny_llama_dir: Path, tmp_path: Path, capsys):
    """Issue 15 §5: `status --json` is one object: the pipeline run's state, outcome and its reason, inputs and
    champions (the text's head), and the step rows under "stages"; also after a skip and with no run at all."""
    from nemoforge import lineage
    from nemoforge_cli.main import main

    def status(*args: str) -> tuple[str, dict]:
        capsys.readouterr()
        assert main(["status", "--workdir", str(tmp_path), *args]) == 0
        text = capsys.readouterr().out
        assert main(["status", "--workdir", str(tmp_path), "--json", *args]) == 0
        return text, json.loads(capsys.readouterr().out)

    recipe, runs = _finished_run_with_champion(tmp_path, tiny_llama_dir)
    runs.set_pipeline_tags("run-1", {lineage.TAG_TASK_LOGS: "20261207-100000"})  # as `nemoforge run` tags it
    logs = tmp_path / "logs" / "20261207-100000"
    logs.mkdir(parents=True)
    (logs / "eval.log").write_text("[KFP Executor ...]: Got executor_input:\n")
    name = recipe.model.name
    champions = [{"name": name, "version": 1, "pipeline_run": "run-1", "model_uri": f"models:/{name}@champion"}]
    text, report = status()
    assert list(report) == ["pipeline_run", "state", "outcome", "outcome_reason", "inputs", "start_time", "end_time",
                            "task_logs", "champions", "stages"]
    assert report["task_logs"] == str(logs) and f"task logs: {logs}/<step>.log (each step's whole output)\n" in text
    assert (report["pipeline_run"], report["state"], report["outcome"], report["outcome_reason"]) == (
        "run-1", "FINISHED", "retrain", "no champion yet")
    assert report["inputs"] == {"corpus": "c" * 64} and report["champions"] == champions
    assert report["start_time"] <= report["end_time"]
    assert text.startswith(
        f"pipeline run {report['pipeline_run']}: {report['state']}, {report['outcome']}: {report['outcome_reason']}\n"
        f"inputs: corpus {report['inputs']['corpus'][:12]}\n"
        f"champion: {name} v1 (pipeline run run-1; models:/{name}@champion)\n"
    )
    [row] = report["stages"]
    assert row["stage"] == "eval" and row["gate"] == "passed" and row["metrics"]["toggle_on"] == 1.0
    assert row["log"] == str(logs / "eval.log")

    reason = _skipped_run(runs, recipe)
    text, report = status()
    assert (report["pipeline_run"], report["state"], report["outcome"], report["outcome_reason"]) == (
        "run-2", "FINISHED", "skipped", reason)
    assert [s["stage"] for s in report["stages"]] == ["check-inputs"] and report["champions"] == champions
    assert text.startswith(f"pipeline run run-2: FINISHED, skipped: {reason}\n")
    _, report = status("--run", "run-1")
    assert report["pipeline_run"] == "run-1" and [s["stage"] for s in report["stages"]] == ["eval"]

    text, report = status("--experiment", "no-runs-yet")
    assert text == "no pipeline run found\n"
    assert report == {"pipeline_run": None, "state": None, "outcome": None, "outcome_reason": None, "inputs": {},
                      "start_time": None, "end_time": None, "task_logs": None, "champions": champions, "stages": []}
