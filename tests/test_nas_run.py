"""The nas stage end to end on the tiny random Llama: child within budget, block library, export, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from nemoforge.artifacts import open_store
from nemoforge.config import Recipe
from nemoforge.data.corpus import CorpusSplits, save_corpus
from nemoforge.data.packing import token_digest
from nemoforge.errors import RecipeError
from nemoforge.models.convert import load_causal_lm
from nemoforge.models.hf.configuration_decilm import BlockConfig
from nemoforge.stages.nas import inputs as inputs_module
from nemoforge.stages.nas import measure as measure_module
from nemoforge.stages.nas import run
from nemoforge.stages.nas import search as search_module
from nemoforge.stages.nas.scoring import parent_pass, score_layer

NAS = {
    "ffn_intermediate_sizes": [512, 256],
    "latency_budget_ratio": 0.75,
    "num_solutions": 2,
    "min_diversity_layers": 1,
    "bld": {"steps": 20, "batch_tokens": 128, "lr": 1e-3, "num_calibration_sequences": 16},
    "scoring": {"num_sequences": 2, "seq_len_tokens": 32},
    # Batch x prefill large enough that the layers, not the 49152-row LM head, dominate the tiny model's latency.
    "cost": {"batch_size": 4, "prefill_tokens": 64, "decode_tokens": 2, "repeats": 3},
}


def recipe(**nas) -> Recipe:
    return Recipe.model_validate({"name": "nas-test", "nas": {**NAS, **nas}})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nas")
    generator = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (16, 64), generator=generator)
    heldout = torch.randint(0, 256, (3, 64), generator=generator)
    save_corpus(CorpusSplits(train, heldout, "test://random", token_digest(train, heldout)), root / "corpus")
    return root


def run_stage(workdir: Path, tiny_llama_dir: Path, rcp: Recipe, out: str = "out"):
    store = open_store(str(workdir))
    return run(
        rcp,
        parent_uri=str(tiny_llama_dir),
        corpus_uri=str(workdir / "corpus"),
        output_uri=str(workdir / out),
        store=store,
    )


@pytest.fixture(scope="module")
def result(workdir: Path, tiny_llama_dir: Path):
    return run_stage(workdir, tiny_llama_dir, recipe())


def test_child_meets_the_latency_budget(result) -> None:
    m = result.metrics
    assert m["latency_budget_ms"] == pytest.approx(0.75 * m["parent_latency_ms"])
    assert m["child_latency_ms"] <= m["latency_budget_ms"] * (1 + 1e-9)
    assert m["speedup"] >= 1 / 0.75 - 1e-9
    assert m["params_child"] <= m["params_parent"]
    assert m["kv_bytes_per_token_child"] <= m["kv_bytes_per_token_parent"] == 4 * 2 * 2 * 16 * 2
    assert m["kl_div_heldout"] > 0 and m["kl_div_predicted"] > 0
    assert m["parent_latency_ms_measured"] > 0 and m["mip_solve_time_s"] > 0
    assert m["bld_loss_final_mean"] < m["bld_loss_init_mean"]
    steps, losses = zip(*result.history["bld_loss"], strict=True)
    assert steps == tuple(range(1, 21)) and losses[-1] < losses[0]
    assert set(result.outputs) >= {"model", "block_library", "solutions"}
    assert result.tags["block_configs"].startswith("attn ")
    assert [d.context for d in result.datasets] == ["calibration", "validation"]


def test_block_library_has_every_layer_and_variant(workdir: Path, result) -> None:
    library = json.loads((workdir / "out" / "block_library.json").read_text())
    header = library["measurement"]
    assert header["batch_size"] == 4 and header["sequence_length"] == 66 and header["dtype"] == "float32"
    assert header["device"]
    assert sorted(library["layers"], key=int) == ["0", "1", "2", "3"]
    assert len(library["layers"]["0"]) == 4  # layer 0 keeps its attention: 4 FFN options
    for layer in ("1", "2", "3"):
        assert len(library["layers"][layer]) == 8
    for layer, variants in library["layers"].items():
        for name, entry in variants.items():
            block = BlockConfig.from_dict(entry["block_config"])
            assert set(entry["stats"]) == {"latency_ms", "param_bytes", "kv_cache_bytes"}
            assert set(entry["stats"]["latency_ms"]) == {"prefill", "decode", "request"}
            assert (entry["stats"]["kv_cache_bytes"] == 0) == block.attention.no_op
            assert set(entry["metrics"]) == {"kl_div", "lm_loss"}
            narrow = "parent *" in name.split("ffn =")[1]
            assert (entry["bld"] is not None) == narrow
            if narrow:
                assert set(entry["bld"]) == {"loss_init", "loss_final"}
            if name.endswith("(parent) && ffn = intermediate size 768 (parent)"):
                assert entry["metrics"]["kl_div"] == 0.0
            else:
                assert entry["metrics"]["kl_div"] > 0.0, (layer, name)
    solutions = json.loads((workdir / "out" / "solutions.json").read_text())
    assert 1 <= len(solutions["solutions"]) <= 2
    assert solutions["solutions"][0]["latency_ms"] == pytest.approx(result.metrics["child_latency_ms"])
    assert len(solutions["pareto"]) >= 2 and solutions["pareto"][-1]["kl_div"] == 0.0
    assert (workdir / "out" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_reloads_with_solution_architecture(workdir: Path, tiny_llama_dir: Path, result) -> None:
    child = load_causal_lm(workdir / "out" / "model")
    solutions = json.loads((workdir / "out" / "solutions.json").read_text())
    expected = [BlockConfig.from_dict(b) for b in solutions["solutions"][0]["block_configs"]]
    assert child.config.block_configs == expected
    # The reloaded child scores the KL the stage reported on the same held-out sequences.
    parent = load_causal_lm(tiny_llama_dir)
    heldout_ids = torch.load(workdir / "corpus" / "heldout.pt")[:2, :32]
    heldout = parent_pass(parent, heldout_ids)
    with torch.no_grad():
        kl, _ = heldout.score(child(heldout_ids).logits)
    assert kl == pytest.approx(result.metrics["kl_div_heldout"], abs=1e-5)


def test_rerun_resumes_from_saved_phases(workdir: Path, tiny_llama_dir: Path, result, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("a finished phase ran again")

    for name in ("distill_layer", "score_layer", "measure_costs"):
        monkeypatch.setattr(measure_module, name, fail)
    again = run_stage(workdir, tiny_llama_dir, recipe())
    assert again.metrics["child_latency_ms"] == result.metrics["child_latency_ms"]
    assert again.metrics["kl_div_heldout"] == pytest.approx(result.metrics["kl_div_heldout"], abs=1e-6)
    # A half-finished scoring phase resumes at the first missing layer.
    (workdir / "out" / "scores" / "layer-003.json").unlink()
    calls = []
    monkeypatch.setattr(measure_module, "score_layer", lambda *a, **k: calls.append(a[2]) or score_layer(*a, **k))
    run_stage(workdir, tiny_llama_dir, recipe())
    assert calls == [3]


def test_infeasible_budget_fails_before_bld(workdir: Path, tiny_llama_dir: Path, result, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("BLD started despite an infeasible budget")

    monkeypatch.setattr(measure_module, "distill_layer", fail)
    with pytest.raises(
        RecipeError, match=r"nas\.latency_budget_ratio=0\.01 is infeasible.*smallest feasible ratio"
    ):
        run_stage(workdir, tiny_llama_dir, recipe(latency_budget_ratio=0.01), out="infeasible")


@pytest.mark.parametrize("case", ["fused", "nothing to fuse"])
def test_ffn_fusion_step_fuses_the_chosen_child_and_records_it(
    workdir: Path, tiny_llama_dir: Path, result, monkeypatch, case: str
) -> None:
    """With ``nas.ffn_fusion`` on, the stage reuses every phase (fusion is not in the key), fuses the child the MIP
    picked (forced here: layers 1-3 attention-free, or all-parent) and records the fusion in metrics, outputs, tags."""
    import dataclasses
    import shutil

    from nemoforge.stages.nas.library import Variant

    out = f"out-{case.replace(' ', '-')}"
    shutil.copytree(workdir / "out", workdir / out)
    libraries = []
    build_library, search = inputs_module.build_library, search_module.search
    monkeypatch.setattr(
        inputs_module, "build_library", lambda *a: libraries.append(build_library(*a)) or libraries[-1]
    )

    def forced(*args, **kwargs):
        library, solutions = libraries[-1], search(*args, **kwargs)
        free = Variant(attention_no_op=True, ffn_size=library.parent_ffn_size)
        choice = [
            row.index(free if case == "fused" and i > 0 else library.parent)
            for i, row in enumerate(library.variants)
        ]
        return [dataclasses.replace(solutions[0], choice=tuple(choice)), *solutions[1:]]

    monkeypatch.setattr(search_module, "search", forced)
    monkeypatch.setattr(measure_module, "distill_layer", lambda *a, **k: pytest.fail("BLD ran again"))
    rcp = recipe(ffn_fusion={"enabled": True, "kl_budget": 100.0})
    fused = run_stage(workdir, tiny_llama_dir, rcp, out)
    m, report = fused.metrics, json.loads((workdir / out / "ffn_fusion.json").read_text())
    child = load_causal_lm(workdir / out / "model")
    if case == "nothing to fuse":
        assert report["status"] == "nothing to fuse" and fused.tags["ffn_fusion"] == "nothing to fuse"
        assert m["ffn_fusion_layers_removed"] == 0 and child.config.num_hidden_layers == 4
        assert m["kl_div_heldout"] == m["kl_div_heldout_unfused"]
        return
    assert fused.outputs["ffn_fusion"].endswith("ffn_fusion.json")
    assert fused.tags["ffn_fusion"] == "layers 1-3 -> 1 (ffn 768+768+768 = 2304)"
    assert m["ffn_fusion_num_runs_fused"] == 1 and m["ffn_fusion_layers_removed"] == 2
    assert [r["layers"] for r in report["runs"]] == [[1, 2, 3]] and report["runs"][0]["widths"] == [768] * 3
    assert report["kl_div_heldout_before"] == m["kl_div_heldout_unfused"] > 0
    assert report["kl_div_heldout_after"] == m["kl_div_heldout"]
    assert child.config.num_hidden_layers == 2 and child.config.intermediate_size_of(1) == 2304
    assert (
        m["child_latency_ms_fused"] > 0 and m["speedup_fused"] > 0
    )  # the cost model's view of the fused child
    # the export is the fused child: it scores the reported KL to the parent
    parent = load_causal_lm(tiny_llama_dir)
    heldout_ids = torch.load(workdir / "corpus" / "heldout.pt")[:2, :32]
    with torch.no_grad():
        kl, _ = parent_pass(parent, heldout_ids).score(child(heldout_ids).logits)
    assert kl == pytest.approx(m["kl_div_heldout"], abs=1e-5)
    print(
        f"\nnas + ffn_fusion (tiny): KL to parent unfused {m['kl_div_heldout_unfused']:.4f}, fused {kl:.4f}"
    )

    # lineage: the stage's MLflow run records the fusion (layers and widths in a tag and the report, KL before and
    # after as metrics, the budget as a param)
    from mlflow import MlflowClient

    from nemoforge import lineage

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    with lineage.Lineage(tracking_uri, "fusion").stage_run("run-1", "nas", rcp, input_uris={}) as tracker:
        tracker.log_result(fused)
    client = MlflowClient(tracking_uri)
    logged = client.get_run(tracker.run_id).data
    assert logged.tags["ffn_fusion"] == "layers 1-3 -> 1 (ffn 768+768+768 = 2304)"
    assert logged.tags["nemoforge.output.ffn_fusion"].endswith("ffn_fusion.json")
    assert logged.params["nas.ffn_fusion.kl_budget"] == "100.0"
    for name in ("kl_div_heldout_unfused", "kl_div_heldout", "ffn_fusion_kl_div_vs_unfused", "ffn_fusion_layers_removed"):
        assert logged.metrics[name] == pytest.approx(m[name])
    copy = client.download_artifacts(tracker.run_id, "reports/ffn_fusion.json", str(workdir / "downloaded"))
    assert json.loads(Path(copy).read_text()) == report


def test_fusion_in_search_credits_the_cost_models_saving(
    workdir: Path, tiny_llama_dir: Path, result, monkeypatch
) -> None:
    """With ``nas.ffn_fusion.in_search`` the MIP's latency of a child is its unfused sum less the cost table's
    intercept per FFN that fusion merges; the fusion step then fuses those runs (the KL budget fits them all)."""
    import shutil

    from nemoforge.stages.nas.cost import CostTable

    shutil.copytree(workdir / "out", workdir / "out-in-search")
    monkeypatch.setattr(measure_module, "distill_layer", lambda *a, **k: pytest.fail("BLD ran again"))
    rcp = recipe(ffn_fusion={"enabled": True, "kl_budget": 100.0, "in_search": True})
    m = run_stage(workdir, tiny_llama_dir, rcp, "out-in-search").metrics
    out = workdir / "out-in-search"
    costs = CostTable.from_json(json.loads((out / "costs.json").read_text()))
    saving_ms = costs.fusion_saving().request_ms(costs.decode_tokens)
    assert m["mip_fusion_saving_ms"] == pytest.approx(saving_ms)
    best = json.loads((out / "solutions.json").read_text())["solutions"][0]
    library = json.loads((out / "block_library.json").read_text())["layers"]
    unfused_ms = costs.fixed.request_ms(costs.decode_tokens) + sum(
        library[str(i)][name]["stats"]["latency_ms"]["request"] for i, name in enumerate(best["layers"])
    )
    assert best["num_ffn_merges"] == m["mip_num_ffn_merges"]
    assert best["latency_ms"] == pytest.approx(unfused_ms - saving_ms * best["num_ffn_merges"])
    assert m["child_latency_ms"] == pytest.approx(best["latency_ms"]) and m["child_latency_ms"] <= m["latency_budget_ms"]
    report = json.loads((out / "ffn_fusion.json").read_text())
    assert sum(len(r["ffn_layers"]) - 1 for r in report["runs"] if r["fused"]) == best["num_ffn_merges"]
    print(f"\nin_search: {best['summary']}, {best['num_ffn_merges']} merges x {saving_ms:.3f} ms")


def test_fusion_in_search_warns_when_the_kl_budget_leaves_a_counted_run_unfused(
    workdir: Path, tiny_llama_dir: Path, result, monkeypatch, caplog
) -> None:
    """A search that counted runs as fused, then a fusion KL budget (0) that fuses none: the exported child is
    slower than the budget the search met, and the stage says which runs and which field."""
    from nemoforge.stages.nas.cost import CostTable, Latency

    # a saving so large that a budget of 5% of the parent is met only by children with a merge
    monkeypatch.setattr(CostTable, "fusion_saving", lambda self: Latency(1e3, 0.0))
    rcp = recipe(latency_budget_ratio=0.05, ffn_fusion={"enabled": True, "kl_budget": 0.0, "in_search": True})
    with caplog.at_level("WARNING", logger="nemoforge.stages.nas.run"):
        m = run_stage(workdir, tiny_llama_dir, rcp, "out-in-search-0").metrics
    assert m["mip_num_ffn_merges"] >= 1 and m["ffn_fusion_num_runs_fused"] == 0
    assert m["child_latency_ms"] < 0 < m["latency_budget_ms"] < m["child_latency_ms_fused"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert re.search(r"over the [\d.]+ ms budget .* nas\.ffn_fusion\.kl_budget left runs \d-\d unfused", warning)
