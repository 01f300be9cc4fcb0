"""The promotion gate's outcome recorded in the MLflow registry: challenger always, champion only on a pass."""

from __future__ import annotations

from pathlib import Path

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
    from nemoforge_cli.main import key_metrics, main

    metrics = {"decode_tokens_per_s": 9.0, "ifeval_prompt_strict": 0.3, "kl_to_parent": 0.1, "lm_loss": 2.0,
               "lm_top1": 0.4, "math_pass1_off": 0.2, "math_pass1_on": 0.25, "parent_lm_top1": 0.45,
               "speedup": 1.4, "speedup_ci_low": 1.3, "toggle_off": 0.95, "toggle_on": 0.9}
    assert [k for k, _ in key_metrics("eval", metrics)] == [
        "toggle_on", "toggle_off", "math_pass1_on", "math_pass1_off", "speedup",
        "decode_tokens_per_s", "ifeval_prompt_strict", "kl_to_parent",
    ]
    assert [k for k, _ in key_metrics("cpt", {"b": 1.0, "a": 2.0})] == ["a", "b"]

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
