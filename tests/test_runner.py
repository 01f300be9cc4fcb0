"""Step keys, the step index and result serialization (the skip/resume logic of every component)."""

from __future__ import annotations

from nemoforge.artifacts.uris import relative_uri
from nemoforge.config import load_recipe
from nemoforge.runner.execute import CORPUS_FIELDS, corpus_key
from nemoforge.runner.index import result_from_json, result_to_json, step_key, stored_uris
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
        reports={"ffn_fusion": "/w/artifacts/run-1/nas/ffn_fusion.json"},
        datasets=[DatasetRef("corpus-train", "/c.txt", "ff", 10)],
        tags={"block_configs": "attn 3/4"},
    )
    assert result_from_json(result_to_json(result)) == result
    # every URI of a result is stored relative to a local artifact root (a moved workdir resolves it again)
    stored = stored_uris(result_to_json(result), lambda uri: relative_uri(uri, "/w/artifacts"))
    assert stored["reports"] == {"ffn_fusion": "run-1/nas/ffn_fusion.json"}


def test_the_stage_table_holds_every_stage_once_in_pipeline_order():
    import pytest

    from nemoforge.config import STAGES
    from nemoforge.runner.stage_table import STAGE_TABLE, stage_entry

    assert tuple(STAGE_TABLE) == STAGES
    assert [name for name, entry in STAGE_TABLE.items() if entry.trains] == ["distill", "cpt", "sft", "rl"]
    assert stage_entry("cpt").run_fn().__module__ == "nemoforge.stages.cpt.stage"
    with pytest.raises(ValueError, match="unknown stage 'dpo'"):
        stage_entry("dpo")


def test_stage_keys_cover_what_each_stage_reads():
    """A stage's key covers its section, the seed, the dtype, the data fields its run() reads, and its inputs'
    digests. rl and eval read sft's data through sft's ``data`` output, so sft's data reaches their keys through
    that output's digest (and its model's), never through the recipe."""
    from nemoforge.config import STAGES
    from nemoforge.runner.stage_table import stage_key

    base = load_recipe("smollm2-135m-demo")
    inputs = {"model": {"uri": "/m", "digest": "m1"}, "data": {"uri": "/d", "digest": "d1"}}

    def moved(change: str) -> set[str]:
        changed = load_recipe("smollm2-135m-demo", [change])
        return {s for s in STAGES if stage_key(base, s, inputs) != stage_key(changed, s, inputs)}

    for change, stages in (
        ("data.arithmetic.max_operand=6", {"sft"}), ("data.sft_uri=x.jsonl", {"sft"}), ("sft.steps=30", {"sft"}),
        ("sft.num_samples=100", {"sft"}), ("data.math_eval_uri=m.jsonl", {"rl", "eval"}),
        ("data.preference_uri=p.jsonl", {"rl"}), ("data.ifeval_uri=i.jsonl", {"eval"}), ("cpt.steps=30", {"cpt"}),
        ("data.seq_len_tokens=128", set()),  # the corpus step's: the stages follow the corpus's digest
        ("seed=1", set(STAGES)), ("dtype=bfloat16", set(STAGES)),
    ):
        assert moved(change) == stages, change
    # sft's data changed: its data output's digest moves rl's and eval's keys
    other_data = {**inputs, "data": {"uri": "/d", "digest": "d2"}}
    assert all(stage_key(base, s, inputs) != stage_key(base, s, other_data) for s in ("rl", "eval"))


def test_preparation_steps_are_runs_of_the_pipeline_run_and_rows_of_status(
    tiny_llama_dir, shared_dir, tmp_path, monkeypatch, capsys
):
    """Issue 15 §5: check-inputs, parent and corpus each get a run under the pipeline run (state, wall time, output),
    so `nemoforge status` lists them above the stages; a later pipeline run shows parent and corpus reused."""
    import json

    from nemoforge import lineage
    from nemoforge.preflight import resolve_recipe
    from nemoforge.runner.execute import run_step
    from nemoforge.runner.retrain import check_inputs_step
    from nemoforge_cli.main import main

    monkeypatch.setenv("NEMOFORGE_CACHE", str(tmp_path / "cache"))
    corpus = shared_dir / "data" / "corpus" / "tinyshakespeare.txt"
    overrides = ["model.parent.source=hf-dir", f"model.parent.path={tiny_llama_dir}", f"data.corpus_uri={corpus}",
                 "data.seq_len_tokens=64", "data.max_sequences=24"]
    workdir = tmp_path / "work"
    recipe = resolve_recipe(load_recipe("smollm2-135m-demo", overrides), workdir)
    refs = {}
    for run_name in ("run-1", "run-2"):
        assert check_inputs_step(recipe, run_name, force=False) == "run"  # no champion yet
        refs |= run_step("parent", recipe, run_name, {})
        refs |= run_step("corpus", recipe, run_name, {"parent": refs["parent"]})
        lineage.Lineage.for_recipe(recipe).finish_pipeline_run(run_name, "FINISHED")

    runs = lineage.Lineage.for_recipe(recipe)
    first = lineage.pipeline_status(runs, "run-1")
    assert [s["stage"] for s in first] == ["check-inputs", "parent", "corpus"]
    assert [(s["state"], s["reused"], s["error"]) for s in first] == [("FINISHED", False, None)] * 3
    assert all(0 <= s["wall_time_s"] < 300 and s["start_time"] <= s["end_time"] for s in first)
    assert first[1]["outputs"] == {"parent": refs["parent"]["uri"]}
    assert first[2]["outputs"] == {"corpus": refs["corpus"]["uri"]}
    num_train, num_heldout = (first[2]["metrics"][f"num_{k}_sequences"] for k in ("train", "heldout"))
    assert num_train > 0 and num_heldout > 0 and num_train + num_heldout == 24

    second = lineage.pipeline_status(runs)  # the newest pipeline run: run-2
    assert [(s["pipeline_run"], s["stage"], s["reused"]) for s in second] == [
        ("run-2", "check-inputs", False), ("run-2", "parent", True), ("run-2", "corpus", True)]
    assert second[2]["metrics"]["num_train_sequences"] == num_train  # the reused step's figures come along
    assert second[0]["run_id"] != first[0]["run_id"]

    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    assert main(["status", "--workdir", str(workdir)]) == 0
    table = capsys.readouterr().out.split("pipeline run run-2", 2)[2]  # after the head, the table's title
    rows = [line for line in table.splitlines() if line.startswith("│ ") and line.split("│")[1].strip()]
    assert [row.split("│")[1].strip() for row in rows] == ["check-inputs", "parent", "corpus"]
    assert "FINISHED (reused)" in rows[1] and "FINISHED (reused)" in rows[2] and "num_train_sequences=" in rows[2]
    assert main(["status", "--workdir", str(workdir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["stages"]  # each with its task log: none, outside `nemoforge run`
    assert rows == json.loads(json.dumps([{**s, "log": None} for s in second], default=str))


def test_a_step_ends_with_one_line_of_its_key_metrics(capsys):
    """Issue 15 §4: the console shows each stage's key metrics as it ends (the task log holds the rest)."""
    from nemoforge.runner.execute import print_key_metrics

    metrics = {"a_metric": 0.0, "math_pass1_off": 0.2, "math_pass1_on": 0.25, "speedup": 1.4, "toggle_off": 0.95,
               "toggle_on": 1.0}
    print_key_metrics("eval", metrics, reused=False)
    print_key_metrics("corpus", {"num_heldout_sequences": 205.0, "num_train_sequences": 1843.0}, reused=True)
    print_key_metrics("parent", {"wall_time_s": 2.6}, reused=False)  # no key metrics: no line
    assert capsys.readouterr().out.splitlines() == [
        "nemoforge: eval: toggle_on=1, toggle_off=0.95, math_pass1_on=0.25, math_pass1_off=0.2",
        "nemoforge: corpus (reused): num_train_sequences=1843, num_heldout_sequences=205",
    ]
