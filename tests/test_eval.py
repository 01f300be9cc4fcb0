"""eval: the multi-criteria gate as a recorded outcome, round-robin timing, held-out LM quality, and the
stage on a tiny model (child vs parent, champion re-evaluated or refused)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_sft_data

from nemoforge.config import GateConfig, Recipe
from nemoforge.stages.eval import speed
from nemoforge.stages.eval.gate import ChampionBaseline, champion_baseline, promotion_gate
from nemoforge.stages.eval.stage import comparison_table, eval_settings_digest
from nemoforge.stats import wilson_interval

# ----------------------------------------------------------------------------------------------- gate
PARENT = {"parent_lm_top1": 0.40, "parent_math_pass1_on": 0.50, "parent_toggle_on": 0.0, "parent_toggle_off": 1.0}
CHILD = {
    "lm_top1": 0.38, "math_pass1_on": 0.45, "toggle_on": 0.95, "toggle_off": 0.92, "decode_tokens_per_s": 40.0,
    "speedup": 1.45, "speedup_ci_low": 1.38, "speedup_ci_high": 1.52,
    "retention_lm_top1_ci_low": 0.9, "retention_lm_top1_ci_high": 1.0,
}
GATE = GateConfig(
    metric="math_pass1_on", min_retention={"lm_top1": 0.9, "math_pass1_on": 0.8}, min_speedup=1.3,
    min_toggle_on=0.9, min_toggle_off=0.9, beat_champion=True,
)


def test_gate_passes_when_every_criterion_is_met():
    outcome = promotion_gate(CHILD | PARENT, GATE, champion=None)
    assert outcome.passed and outcome.failed == []
    assert outcome.checks == [
        "ok: retention lm_top1=0.95 (95% CI 0.9 to 1) >= 0.9 (child 0.38, parent 0.4)",
        "ok: retention math_pass1_on=0.9 >= 0.8 (child 0.45, parent 0.5)",
        "ok: decode speedup=1.45 (95% CI 1.38 to 1.52) >= 1.3",
        "ok: toggle_on=0.95 >= 0.9",
        "ok: toggle_off=0.92 >= 0.9",
        "ok: no champion yet",
    ]


def test_gate_names_every_failed_criterion():
    worse = CHILD | PARENT | {"lm_top1": 0.30, "speedup": 1.1, "toggle_off": 0.5}
    outcome = promotion_gate(worse, GATE, champion=None)
    assert not outcome.passed
    assert [f.split("=")[0] for f in outcome.failed] == ["retention lm_top1", "decode speedup", "toggle_off"]
    # a metric that was not measured fails its criterion instead of raising
    missing = promotion_gate({}, GATE, champion=None)
    assert len(missing.failed) == 5 and missing.failed[0].startswith("retention lm_top1: not measured")


def test_gate_retention_of_a_zero_parent_and_the_child_that_promoted_worse_than_its_parent():
    # issue 11: math_pass1_on 0.0 against the parent's 0.042 was promoted by a floor of 0.0; retention stops it
    gate = GateConfig(min_retention={"math_pass1_on": 0.8})
    bad = promotion_gate({"math_pass1_on": 0.0, "parent_math_pass1_on": 0.042}, gate, champion=None)
    assert bad.failed == ["retention math_pass1_on=0 >= 0.8 (child 0, parent 0.042)"]
    zero = promotion_gate({"math_pass1_on": 0.0, "parent_math_pass1_on": 0.0}, gate, champion=None)
    assert zero.passed and zero.checks[0] == "ok: retention math_pass1_on: parent 0, nothing to lose (child 0)"


def test_gate_against_the_champion_is_strict_and_like_with_like():
    gate = GateConfig(metric="math_pass1_on")
    metrics = {"math_pass1_on": 0.5}
    same = "recorded under the current eval settings"
    assert promotion_gate(metrics, gate, ChampionBaseline(3, {"math_pass1_on": 0.4}, same)).passed
    worse = promotion_gate(metrics, gate, ChampionBaseline(3, {"math_pass1_on": 0.6}, same))
    assert worse.failed == [f"math_pass1_on=0.5 > champion v3 0.6 ({same})"]
    tie = promotion_gate(metrics, gate, ChampionBaseline(3, {"math_pass1_on": 0.5}, same))
    assert tie.failed == [f"math_pass1_on=0.5 ties champion v3 0.5: a tie keeps the champion ({same})"]
    refused = promotion_gate(metrics, gate, ChampionBaseline(3, None, "comparison refused: why"))
    assert refused.failed == ["champion v3: comparison refused: why"]
    assert promotion_gate(metrics, GateConfig(beat_champion=False), None).checks == []  # nothing set, nothing checked


def test_champion_baseline_recorded_re_evaluated_or_refused(tmp_path: Path):
    from nemoforge.artifacts import open_store

    store = open_store(str(tmp_path / "store"))
    model_dir = tmp_path / "champion-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    measured: list[str] = []

    def measure(uri: str) -> dict[str, float]:
        measured.append(uri)
        return {"math_pass1_on": 0.25}

    record = {"version": 2, "model_uri": str(model_dir), "metrics": {"math_pass1_on": 0.5}, "eval_settings": "a" * 64}
    assert champion_baseline(None, "a" * 64, store, measure) is None
    recorded = champion_baseline(record, "a" * 64, store, measure)
    assert recorded.metrics == {"math_pass1_on": 0.5} and measured == []
    again = champion_baseline(record, "b" * 64, store, measure)
    assert again.metrics == {"math_pass1_on": 0.25} and measured == [str(model_dir)]
    assert again.note == "re-evaluated under the current eval settings (recorded under eval settings aaaaaaaaaaaa)"
    gone = champion_baseline(record | {"model_uri": str(tmp_path / "deleted")}, "b" * 64, store, measure)
    assert gone.metrics is None and gone.note == (
        f"comparison refused: recorded under eval settings aaaaaaaaaaaa, not the current bbbbbbbbbbbb, "
        f"and its model {tmp_path / 'deleted'} is not in the store"
    )


def test_eval_settings_digest_covers_eval_but_not_the_gate():
    base = Recipe(name="t")
    digest = eval_settings_digest(base, "p", "h", None)
    assert digest == eval_settings_digest(Recipe(name="t", eval={"gate": {"min_speedup": 2.0}}), "p", "h", None)
    assert digest != eval_settings_digest(Recipe(name="t", eval={"num_samples": 4}), "p", "h", None)
    assert digest != eval_settings_digest(base, "other problems", "h", None)
    assert digest != eval_settings_digest(base, "p", "other held-out rows", None)
    assert digest != eval_settings_digest(Recipe(name="t", seed=1), "p", "h", None)  # its sampling streams


def test_comparison_table():
    figures = {
        "math_pass1_on": 0.25, "math_pass1_on_ci_low": 0.1, "math_pass1_on_ci_high": 0.5,
        "parent_math_pass1_on": 0.5, "parent_math_pass1_on_ci_low": 0.3, "parent_math_pass1_on_ci_high": 0.7,
        "retention_math_pass1_on": 0.5, "retention_math_pass1_on_ci_low": 0.2, "retention_math_pass1_on_ci_high": 1.1,
        "decode_tokens_per_s": 30.0, "decode_tokens_per_s_min": 28.0, "decode_tokens_per_s_max": 31.0,
        "parent_decode_tokens_per_s": 20.0, "parent_decode_tokens_per_s_min": 19.0,
        "parent_decode_tokens_per_s_max": 22.0, "speedup": 1.5, "speedup_ci_low": 1.4, "speedup_ci_high": 1.6,
        "toggle_on": 1.0, "parent_toggle_on": 0.0, "retention_toggle_on": math.inf,
    }
    table = comparison_table(figures)
    assert "| math_pass1_on | 0.25 | 0.5 | -0.25 | [0.1, 0.5] | [0.3, 0.7] | 0.5 [0.2, 1.1] |" in table
    assert "| decode_tokens_per_s | 30 | 20 | +10 | [28, 31] | [19, 22] | 1.5 [1.4, 1.6] |" in table
    assert "| toggle_on | 1 | 0 | +1 | - | - | inf - |" in table


# ------------------------------------------------------------------------------------- speed, held-out
def test_decode_timing_is_round_robin_with_alternating_order(monkeypatch: pytest.MonkeyPatch):
    calls: list[str] = []
    models = {"child": torch.nn.Linear(1, 1), "parent": torch.nn.Linear(1, 1)}
    label_of = {id(m): label for label, m in models.items()}

    def fake_tokens_per_s(model, ids_1T, num_tokens):
        calls.append(label_of[id(model)])
        return {"child": 30.0, "parent": 20.0}[label_of[id(model)]] + len(calls)

    monkeypatch.setattr(speed, "generate", lambda model, ids, n: ids)
    monkeypatch.setattr(speed, "_tokens_per_s", fake_tokens_per_s)
    tokenizer = type("Tok", (), {"encode": lambda self, text, add_special_tokens: [1, 2, 3]})()
    timing = speed.time_decode_round_robin(models, tokenizer, num_tokens=8, repeats=3)
    assert calls == ["child", "parent", "parent", "child", "child", "parent"]
    assert timing["child"].tokens_per_s_R == [31.0, 34.0, 35.0] and timing["parent"].tokens_per_s_R == [22.0, 23.0, 26.0]
    assert (timing["child"].median, timing["child"].min, timing["child"].max) == (34.0, 31.0, 35.0)


def test_next_token_scores_match_an_independent_count(tiny_llama_dir: Path):
    from transformers import LlamaForCausalLM

    from nemoforge.models.convert import load_causal_lm
    from nemoforge.stages.eval.heldout import next_token_scores
    from nemoforge.training.evaluate import evaluate_heldout

    torch.manual_seed(0)
    ids_NT = torch.randint(0, 500, (5, 12))
    model = load_causal_lm(tiny_llama_dir).eval()
    scores = next_token_scores(model, ids_NT, batch_size=2)
    assert scores.tokens_N == [11] * 5
    reference = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        logits_NTV = reference(ids_NT).logits
    hits_N = (logits_NTV[:, :-1].argmax(-1) == ids_NT[:, 1:]).sum(1).tolist()
    assert scores.correct_N == hits_N and scores.top1 == sum(hits_N) / 55
    assert scores.loss == pytest.approx(evaluate_heldout(model, ids_NT, batch_size=5)["loss_heldout"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- stage
def _corpus(tmp_path: Path) -> str:
    from nemoforge.data.corpus import CorpusSplits, save_corpus
    from nemoforge.data.packing import token_digest

    torch.manual_seed(1)
    train, heldout = torch.randint(0, 500, (4, 16)), torch.randint(0, 500, (6, 16))
    save_corpus(CorpusSplits(train, heldout, "test://corpus", token_digest(train, heldout)), tmp_path / "corpus")
    return str(tmp_path / "corpus")


TINY_EVAL = {"num_problems": 2, "num_samples": 2, "max_new_tokens": 8, "decode_tokens": 8, "decode_repeats": 3,
             "lm_num_sequences": 4}


def test_eval_stage_child_vs_parent(tiny_llama_dir: Path, tmp_path: Path):
    from nemoforge.artifacts import open_store
    from nemoforge.stages.eval import run

    store = open_store(str(tmp_path / "store"))
    gate = {"min_metric": 0.5, "min_retention": {"lm_top1": 0.9}, "min_speedup": 5.0, "min_toggle_on": 0.9}
    recipe = Recipe(name="test", sft={"num_samples": 40}, eval=TINY_EVAL | {"gate": gate})
    data_uri = write_sft_data(recipe, store, store.join("run-1", "sft", "data"))
    result = run(recipe, model_uri=str(tiny_llama_dir), parent_uri=str(tiny_llama_dir),
                 output_uri=store.join("run-1", "eval"), store=store, corpus_uri=_corpus(tmp_path), data_uri=data_uri)
    m = result.metrics
    assert m["math_pass1_on"] == m["parent_math_pass1_on"] == 0.0  # a random model answers nothing right
    assert (m["math_pass1_on_ci_low"], m["math_pass1_on_ci_high"]) == pytest.approx(wilson_interval(0, 4))
    assert (m["math_pass1_off_ci_low"], m["math_pass1_off_ci_high"]) == pytest.approx(wilson_interval(0, 2))
    assert m["kl_to_parent"] == pytest.approx(0.0, abs=1e-5)  # same weights
    # held-out text: 4 of the corpus's 6 held-out rows, 15 predicted tokens each; same weights, same figures
    assert result.tags["lm_heldout_rows"] == "4" and 0.0 <= m["lm_top1"] == m["parent_lm_top1"] <= 1.0
    assert m["lm_loss_ci_low"] < m["lm_loss"] < m["lm_loss_ci_high"] and m["lm_loss"] == pytest.approx(m["parent_lm_loss"])
    vocab_size = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
    assert m["lm_loss"] == pytest.approx(math.log(vocab_size), rel=0.05)  # a random init is near uniform over the vocab
    for name in ("math_pass1_on", "toggle_on", "lm_top1"):  # identical models retain everything, resample by resample
        assert (m[f"retention_{name}"], m[f"retention_{name}_ci_low"], m[f"retention_{name}_ci_high"]) == (1, 1, 1)
    assert m["decode_tokens_per_s_min"] <= m["decode_tokens_per_s"] <= m["decode_tokens_per_s_max"]
    assert m["speedup"] == pytest.approx(m["decode_tokens_per_s"] / m["parent_decode_tokens_per_s"])
    assert m["speedup_ci_low"] <= m["speedup_ci_high"]

    assert m["gate_passed"] == 0.0 and result.tags["gate"] == "failed"
    failed = result.tags["gate_failed"].split("; ")
    assert [f.split("=")[0].split(":")[0] for f in failed] == ["math_pass1_on", "decode speedup", "toggle_on"]
    assert "ok: retention lm_top1" in result.tags["gate_checks"] and "ok: no champion yet" in result.tags["gate_checks"]
    report = store.read_json(result.outputs["report"])
    assert report["gate"]["passed"] is False and report["gate"]["failed"] == failed
    assert len(report["decode_tokens_per_s_rounds"]["child"]) == 3 and report["eval_settings"] == result.tags["eval_settings"]
    table = Path(result.outputs["comparison"]).read_text()
    assert table.startswith("| metric | child | parent |") and "| lm_top1 |" in table and "| lm_loss |" in table
    assert [d.name for d in result.datasets] == ["eval-math", "eval-heldout-text"]
    assert result.datasets[0].source_uri == f"{data_uri}/heldout.jsonl"  # sft's held-out split, read from sft's output


def test_eval_stage_re_evaluates_or_refuses_a_champion_from_other_settings(tiny_llama_dir: Path, tmp_path: Path):
    from nemoforge.artifacts import open_store
    from nemoforge.stages.eval import run

    store = open_store(str(tmp_path / "store"))
    recipe = Recipe(name="test", sft={"num_samples": 40}, eval=TINY_EVAL)
    data_uri = write_sft_data(recipe, store, store.join("run-1", "sft", "data"))
    # the champion was measured under other settings (pass@1 0.9 on an easier set); its model is the same weights
    record = {"version": 1, "model_uri": str(tiny_llama_dir), "metrics": {"math_pass1_on": 0.9}, "eval_settings": "0" * 64}
    result = run(recipe, model_uri=str(tiny_llama_dir), parent_uri=str(tiny_llama_dir),
                 output_uri=store.join("run-1", "eval"), store=store, corpus_uri=_corpus(tmp_path), data_uri=data_uri,
                 champion=record)
    # re-measured under the current settings it scores what the child scores: a tie, which keeps the champion
    assert result.tags["gate_failed"] == (
        "math_pass1_on=0 ties champion v1 0: a tie keeps the champion (re-evaluated under the current eval settings "
        "(recorded under eval settings 000000000000))"
    )
    assert store.read_json(result.outputs["report"])["champion"]["metrics"]["lm_top1"] == result.metrics["lm_top1"]

    refused = run(recipe, model_uri=str(tiny_llama_dir), parent_uri=str(tiny_llama_dir),
                  output_uri=store.join("run-2", "eval"), store=store, data_uri=data_uri,
                  champion=record | {"model_uri": str(tmp_path / "gone")})
    assert refused.tags["gate_failed"].startswith("champion v1: comparison refused: recorded under eval settings 0000")
    assert "lm_top1" not in refused.metrics and "lm_heldout_rows" not in refused.tags  # no corpus given
