"""eval: mean pass@1 on literal samples, the promotion gate as a recorded outcome, the stage on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemoforge.config import GateConfig, Recipe
from nemoforge.stages.eval.gate import promotion_gate
from nemoforge.stages.eval.stage import comparison_table, mean_pass_at_1


def test_mean_pass_at_1_of_k_samples():
    # 3 problems x 4 samples: 2/4, 4/4, 0/4 correct -> (0.5 + 1 + 0) / 3
    correct = [[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert mean_pass_at_1(correct) == pytest.approx(0.5)
    assert mean_pass_at_1([[1.0], [0.0]]) == 0.5


def test_gate_passes_and_fails_as_recorded_outcomes():
    gate = GateConfig(metric="math_pass1_on", min_metric=0.2, min_decode_tokens_per_s=10.0, beat_champion=True)
    metrics = {"math_pass1_on": 0.5, "decode_tokens_per_s": 40.0}
    first = promotion_gate(metrics, gate, champion=None)
    assert first.passed and len(first.checks) == 3
    champion = {"version": 3, "metrics": {"math_pass1_on": 0.6}}
    worse = promotion_gate(metrics, gate, champion)
    assert not worse.passed
    assert worse.checks[-1].startswith("fail: math_pass1_on=0.5 >= champion v3 0.6")
    assert promotion_gate({"math_pass1_on": 0.6, "decode_tokens_per_s": 40.0}, gate, champion).passed  # ties pass
    slow = promotion_gate({"math_pass1_on": 0.9, "decode_tokens_per_s": 5.0}, gate, champion)
    assert not slow.passed and [c.split(":")[0] for c in slow.checks] == ["ok", "fail", "ok"]
    missing = promotion_gate({}, gate, None)
    assert not missing.passed  # a missing metric fails, it does not raise


def test_comparison_table():
    table = comparison_table({"math_pass1_on": 0.25, "toggle_on": 1.0}, {"math_pass1_on": 0.5, "toggle_on": 0.0})
    assert "| math_pass1_on | 0.25 | 0.5 | -0.25 |" in table and "| toggle_on | 1 | 0 | +1 |" in table


def test_eval_stage_child_vs_parent(tiny_llama_dir: Path, tmp_path: Path):
    from nemoforge.artifacts import open_store
    from nemoforge.stages.eval import run

    store = open_store(str(tmp_path / "store"))
    recipe = Recipe(
        name="test",
        sft={"num_samples": 40},
        eval={"num_problems": 2, "num_samples": 2, "max_new_tokens": 8, "decode_tokens": 8,
              "gate": {"min_metric": 0.5}},
    )
    result = run(recipe, model_uri=str(tiny_llama_dir), parent_uri=str(tiny_llama_dir),
                 output_uri=store.join("run-1", "eval"), store=store)
    m = result.metrics
    assert m["math_pass1_on"] == m["parent_math_pass1_on"] == 0.0  # a random model answers nothing right
    assert m["kl_to_parent"] == pytest.approx(0.0, abs=1e-5)  # same weights
    assert m["decode_tokens_per_s"] > 0 and m["gate_passed"] == 0.0
    assert result.tags["gate"] == "failed" and "fail: math_pass1_on=0.0 >= floor 0.5" in result.tags["gate_checks"]
    assert Path(result.outputs["comparison"]).read_text().startswith("| metric | child | parent |")
    assert store.read_json(result.outputs["report"])["gate"]["passed"] is False
