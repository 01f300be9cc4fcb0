"""eval's IFEval metrics: lm-eval's real checkers on hand-picked replies to real IFEval rows, the strict
accuracies on literal results, and the metrics of the eval stage on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_sft_data

from nemoforge.config import Recipe
from nemoforge.stages.eval.ifeval import (
    follow_strict,
    read_ifeval,
    sample_prompts,
    strict_accuracy,
    unavailable_instructions,
)

IFEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ifeval" / "input_data.jsonl"
pytestmark = pytest.mark.skipif(not IFEVAL.is_file(), reason=f"{IFEVAL} is not there (../shared beside the checkout)")


def _punkt_missing() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        return True
    return False


@pytest.fixture(scope="module")
def rows():
    return {p.key: p for p in read_ifeval(IFEVAL)}


def test_reads_the_real_file(rows):
    assert len(rows) == 541
    first = rows[1000]
    assert first.instruction_id_list == (
        "punctuation:no_comma", "detectable_format:number_highlighted_sections", "length_constraints:number_words",
    )
    assert first.kwargs[2] == {"relation": "at least", "num_words": 300}


def test_checker_passes_a_reply_that_follows_and_fails_one_that_violates(rows):
    no_commas = rows[1001]  # Shakespearean itinerary: "You are not allowed to use any commas"
    assert no_commas.instruction_id_list == ("punctuation:no_comma",)
    assert follow_strict(no_commas, "On the first day thou shalt behold the temples of Kyoto.") == [True]
    assert follow_strict(no_commas, "On the first day, thou shalt behold the temples of Kyoto.") == [False]

    haiku = rows[3084]  # no commas + end with the exact phrase "in India."
    assert haiku.instruction_id_list == ("punctuation:no_comma", "startend:end_checker")
    follows = "Saffron kites drift high\nsalt flats glow under the moon\nstrange dreams in India."
    assert follow_strict(haiku, follows) == [True, True]
    assert follow_strict(haiku, "Saffron kites, drifting high in India.") == [False, True]
    assert follow_strict(haiku, "Saffron kites drift high over Gujarat.") == [True, False]
    assert follow_strict(haiku, "   ") == [False, False]  # an empty reply follows nothing (strict)


def test_strict_accuracy_prompt_and_instruction_level():
    # 3 prompts: all followed; 1 of 2; 1 of 2 -> prompt level 1/3, instruction level 4/6
    scores = strict_accuracy([[True, True], [True, False], [False, True]])
    assert scores == {"ifeval_prompt_strict": pytest.approx(1 / 3), "ifeval_instruction_strict": pytest.approx(4 / 6)}
    assert strict_accuracy([[False]]) == {"ifeval_prompt_strict": 0.0, "ifeval_instruction_strict": 0.0}
    with pytest.raises(ValueError, match="at least one prompt"):
        strict_accuracy([])


def test_checkers_needing_missing_nltk_data_are_named_not_downloaded(rows):
    unchecked = unavailable_instructions(list(rows.values()))
    expected = ["change_case:capital_word_frequency", "length_constraints:number_sentences"]
    assert unchecked == (expected if _punkt_missing() else [])


def test_sample_is_seeded_in_file_order_and_excludes_ids(rows):
    prompts = list(rows.values())
    a = sample_prompts(prompts, 10, seed=3, exclude=["punctuation:no_comma"])
    assert len(a) == 10 and a == sample_prompts(prompts, 10, seed=3, exclude=["punctuation:no_comma"])
    position = {p.key: i for i, p in enumerate(prompts)}
    assert [position[p.key] for p in a] == sorted(position[p.key] for p in a)  # file order
    assert all("punctuation:no_comma" not in p.instruction_id_list for p in a)
    assert [p.key for p in sample_prompts(prompts, 10, seed=4)] != [p.key for p in a]
    assert len(sample_prompts(prompts, None, seed=0, exclude=["punctuation:no_comma"])) == 541 - 66


def test_eval_stage_reports_ifeval_child_vs_parent(tiny_llama_dir: Path, tmp_path: Path):
    import json

    from nemoforge.artifacts import open_store
    from nemoforge.stages.eval import run

    store = open_store(str(tmp_path / "store"))
    recipe = Recipe(
        name="test",
        data={"ifeval_uri": str(IFEVAL)},
        sft={"num_samples": 40},
        eval={"num_problems": 1, "num_samples": 1, "max_new_tokens": 8, "decode_tokens": 8,
              "ifeval_num_prompts": 3, "ifeval_max_new_tokens": 12},
    )
    data_uri = write_sft_data(recipe, store, store.join("run-1", "sft", "data"))
    result = run(recipe, model_uri=str(tiny_llama_dir), parent_uri=str(tiny_llama_dir),
                 output_uri=store.join("run-1", "eval"), store=store, data_uri=data_uri)
    m = result.metrics
    assert result.tags["ifeval_prompts"] == "3"
    assert result.tags["ifeval_unchecked"] == (", ".join(unavailable_instructions(read_ifeval(IFEVAL))) or "none")
    assert [d.name for d in result.datasets] == ["eval-math", "eval-ifeval"] and result.datasets[1].num_rows == 3

    samples = json.loads((Path(result.outputs["samples"]) / "child.json").read_text())
    replies = [s for s in samples if s.get("task") == "ifeval"]
    assert len(replies) == 3
    # the logged booleans are the checker's on the logged replies, and the metrics aggregate them
    by_key = {p.key: p for p in read_ifeval(IFEVAL)}
    for s in replies:
        assert s["followed"] == follow_strict(by_key[s["key"]], s["response"])
    assert {k: m[k] for k in ("ifeval_prompt_strict", "ifeval_instruction_strict")} == pytest.approx(
        strict_accuracy([s["followed"] for s in replies])
    )
    # same weights, greedy replies: the parent scores the same; both sit side by side in the table
    assert m["parent_ifeval_prompt_strict"] == m["ifeval_prompt_strict"]
    assert m["parent_ifeval_instruction_strict"] == m["ifeval_instruction_strict"]
    table = Path(result.outputs["comparison"]).read_text()
    value = f"{m['ifeval_instruction_strict']:.4g}"
    assert f"| ifeval_instruction_strict | {value} | {value} | +0 |" in table
    assert "| ifeval_prompt_strict |" in table
