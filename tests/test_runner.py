"""Step keys, the step index and result serialization (the skip/resume logic of every component)."""

from __future__ import annotations

from nemoforge.config import load_recipe
from nemoforge.runner import CORPUS_FIELDS, corpus_key, result_from_json, result_to_json, step_key
from nemoforge.stages.result import DatasetRef, StageResult


def test_step_key_follows_section_and_input_digests():
    a = load_recipe("smollm2-135m-demo")
    b = load_recipe("smollm2-135m-demo", ["cpt.steps=5"])
    inputs = {"model": {"uri": "/x", "digest": "d1"}, "corpus": {"uri": "/c", "digest": "c1"}}
    assert step_key("distill", a.distill, inputs) == step_key("distill", b.distill, inputs)
    assert step_key("cpt", a.cpt, inputs) != step_key("cpt", b.cpt, inputs)
    moved = {**inputs, "model": {"uri": "/elsewhere", "digest": "d1"}}
    assert step_key("cpt", a.cpt, inputs) == step_key("cpt", a.cpt, moved)  # URIs do not matter, digests do
    changed = {**inputs, "model": {"uri": "/x", "digest": "d2"}}
    assert step_key("cpt", a.cpt, inputs) != step_key("cpt", a.cpt, changed)


def test_corpus_key_covers_the_corpus_fields_only():
    base = load_recipe("smollm2-135m-demo")
    parent = {"parent": {"uri": "file:///p", "digest": "abc"}}
    key = corpus_key(base, parent)
    retuned = load_recipe("smollm2-135m-demo", ["data.arithmetic.max_operand=6", "data.sft_uri=x.jsonl"])
    assert corpus_key(retuned, parent) == key  # reasoning data: the corpus (and the compression half) is reused
    assert set(base.data.model_dump()) - CORPUS_FIELDS == {"sft_uri", "arithmetic", "math_eval_uri", "preference_uri",
                                                           "ifeval_uri"}
    for change in ("data.seq_len_tokens=128", "data.teacher_corpus.num_sequences=8", "seed=1"):
        assert corpus_key(load_recipe("smollm2-135m-demo", [change]), parent) != key, change
    assert corpus_key(base, {"parent": {"uri": "file:///p", "digest": "other"}}) != key


def test_result_round_trips_through_json():
    result = StageResult(
        metrics={"kl": 0.5},
        history={"loss": [(1, 2.0), (2, 1.5)]},
        outputs={"model": "/m"},
        digests={"model": "abc"},
        plots={"loss": "/m/loss.png"},
        datasets=[DatasetRef("corpus-train", "/c.txt", "ff", 10)],
        tags={"block_configs": "attn 3/4"},
    )
    assert result_from_json(result_to_json(result)) == result
