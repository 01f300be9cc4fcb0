"""The nas stage: Puzzle on a Llama parent (arXiv 2411.19146), end to end at small scale.

    library  (§2, App. A)  per layer {parent attention, no_op} x {parent FFN, narrow widths, no_op};
                           narrow FFNs pruned by Channel Contribution
    BLD      (§3)          each narrow FFN trained on the parent's activations (decoupled, normalized MSE)
    scoring  (§4.2)        replace-1-block KL(parent || model) and LM loss on held-out sequences
    cost     (§4.1)        latency per sub-block shape measured on the pod's GPU (else CPU); parameter, KV bytes
    MIP      (§4.2, App.B) one variant per layer under the latency/memory budget; N diverse solutions; a sweep;
                           with ``nas.ffn_fusion.in_search`` the latency counts what fusing the child's
                           attention-free runs saves (``mip.py``)
    child                  solution 1 built from parent attention + BLD-trained FFNs, exported as nemotron-nas
    fusion   (FFN Fusion,  optional, ``nas.ffn_fusion``: runs of attention-free layers of the child fused into one
             LN-Ultra §2)  wide FFN each within a KL budget (``fusion.py``); the fused child is the one exported

:func:`run` runs them as phases, each a function of its own module that returns its result: ``inputs.load_inputs``
(parent, corpus, library, the phase key), ``measure.cost_phase``, ``search.check_budget``, ``measure.bld_phase``,
``measure.scoring_phase``, ``search.mip_phase``, ``child.child_phase`` (build, score, fuse), then the export and
the reports (``report.py``: metrics, ``block_library.json``, ``solutions.json``).

Outputs under ``output_uri``: ``model/`` (the child checkpoint), ``block_library.json`` (NVlabs/puzzle layout
with a measurement header), ``solutions.json``, ``pareto.png``, and the resumable phase results ``bld/``
(trained FFN weights per layer), ``scores/`` (per layer) and ``costs.json``; with fusion on, ``ffn_fusion.json``
(the runs, their layers, widths and KL, and the held-out KL to the parent before and after). Each phase result carries a key
of the recipe's nas section, the dtype and the inputs, and is reused on a re-run only when the key matches, so an
interrupted stage resumes from the last finished layer of the phase it was in. Fusion runs after the phases and
is not part of the key, so turning it on or changing its budget reuses them all.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch

from nemoforge.artifacts.digests import digest_path
from nemoforge.artifacts.store import ArtifactStore
from nemoforge.config import Recipe
from nemoforge.models.block_configs import summarize
from nemoforge.models.export import export_checkpoint
from nemoforge.runtime import seed_for
from nemoforge.stages.nas.bld import BLDResult
from nemoforge.stages.nas.child import Child, child_phase
from nemoforge.stages.nas.cost import CostTable
from nemoforge.stages.nas.inputs import NASInputs, load_inputs
from nemoforge.stages.nas.library import Variant
from nemoforge.stages.nas.measure import bld_phase, cost_phase, scoring_phase
from nemoforge.stages.nas.plots import plot_pareto
from nemoforge.stages.nas.report import block_library_json, child_metrics, mean_curve, solutions_json
from nemoforge.stages.nas.scoring import parent_pass
from nemoforge.stages.nas.search import Budget, Search, check_budget, mip_phase
from nemoforge.stages.result import DatasetRef, StageResult

log = logging.getLogger(__name__)


def run(
    recipe: Recipe, *, parent_uri: str, corpus_uri: str, output_uri: str, store: ArtifactStore
) -> StageResult:
    """Search a child of the parent by Puzzle and export it (see the module docstring for the phases).

    Args:
        recipe: the resolved recipe (``recipe.nas``, ``recipe.dtype``).
        parent_uri: the parent checkpoint (a Llama or all-parent DeciLM directory).
        corpus_uri: the corpus step's output (``load_corpus``): train rows calibrate BLD, held-out rows score.
        output_uri: where everything is written.
        store: the artifact store for all URIs.

    Returns:
        Metrics (parent/child predicted latency, speedup, params, KV bytes per token, held-out KL, MIP time),
        the BLD loss history, outputs (``model``, ``block_library``, ``solutions``), the Pareto plot, datasets, tags.

    Raises:
        RecipeError: an FFN width not below the parent's, or a budget no child meets (names the field and the
            smallest feasible value).
        InputNotFoundError: the parent or corpus URI does not exist.
    """
    nas = recipe.nas
    timings: dict[str, float] = {}
    started = time.perf_counter()
    torch.manual_seed(seed_for(recipe, "nas"))
    inputs = load_inputs(recipe, parent_uri=parent_uri, corpus_uri=corpus_uri, output_uri=output_uri, store=store)
    model, library, phase = inputs.model, inputs.library, inputs.phase

    # Cost first: it takes seconds and tells whether the budgets can be met before BLD and scoring run.
    t = time.perf_counter()
    costs = cost_phase(model, library, recipe, phase)
    budget = check_budget(library, costs, nas)
    timings["time_cost_s"] = time.perf_counter() - t

    t = time.perf_counter()
    bld = bld_phase(model, library, inputs.calibration_ids, recipe, phase)
    narrow_mlps = [{w: r.mlp(model) for w, r in layer.items()} for layer in bld]
    timings["time_bld_s"] = time.perf_counter() - t

    t = time.perf_counter()
    heldout = parent_pass(model, inputs.heldout_ids)
    scores = scoring_phase(model, library, heldout, narrow_mlps, phase)
    timings["time_scoring_s"] = time.perf_counter() - t

    t = time.perf_counter()
    found = mip_phase(library, costs, scores, nas, budget)
    timings["time_mip_s"] = time.perf_counter() - t

    t = time.perf_counter()
    child = child_phase(model, library, found.chosen, narrow_mlps, heldout, nas.ffn_fusion)
    result = _write_outputs(inputs, child, found, budget, bld=bld, scores=scores, costs=costs, store=store)
    timings["time_export_s"] = time.perf_counter() - t
    timings["wall_time_s"] = time.perf_counter() - started

    result.metrics.update(
        child_metrics(recipe, model, child, library, costs, found, bld, heldout, budget.latency_budget_ms)
    )
    result.metrics.update(child.fusion_metrics)
    result.metrics.update(timings)
    result.history["bld_loss"] = mean_curve([r.losses for layer in bld for r in layer.values()])
    corpus = inputs.corpus
    result.datasets.extend(
        [
            DatasetRef(
                "corpus-calibration", corpus.source_uri, corpus.digest, len(inputs.calibration_ids), "calibration"
            ),
            DatasetRef("corpus-heldout", corpus.source_uri, corpus.digest, len(inputs.heldout_ids), "validation"),
        ]
    )
    result.tags.update(
        {
            "block_configs": summarize(child.model.config.block_configs, library.hidden_size),
            "device": costs.measurement["device"],
        }
    )
    if child.fusion_report is not None:
        _report_fusion(result, child, costs, found, budget, in_search=nas.ffn_fusion.in_search)
    log.info(
        "nas: child %s, predicted latency %.1f of %.1f ms (x%.2f), held-out KL %.4f",
        result.tags["block_configs"],
        found.solutions[0].latency_ms,
        found.parent.latency_ms,
        result.metrics["speedup"],
        child.kl_div_heldout,
    )
    return result


def _write_outputs(
    inputs: NASInputs,
    child: Child,
    found: Search,
    budget: Budget,
    *,
    bld: list[dict[int, BLDResult]],
    scores: list[dict[Variant, dict[str, float]]],
    costs: CostTable,
    store: ArtifactStore,
) -> StageResult:
    """Export the child and write the stage's files under its output: ``model/``, ``pareto.png``,
    ``block_library.json``, ``solutions.json`` and with fusion ``ffn_fusion.json``.

    Returns:
        A result with the outputs, the model's digest, the Pareto plot, and the fusion report among its reports.
    """
    phase, library = inputs.phase, inputs.library
    outputs = {
        "model": phase.uri("model"),
        "block_library": phase.uri("block_library.json"),
        "solutions": phase.uri("solutions.json"),
        "bld": phase.uri("bld"),
    }
    if child.fusion_report is not None:
        outputs["ffn_fusion"] = phase.uri("ffn_fusion.json")
        store.write_json(outputs["ffn_fusion"], child.fusion_report)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_checkpoint(child.model, inputs.tokenizer, Path(tmp) / "model")
        digests = {"model": digest_path(model_dir)}
        store.put(model_dir, outputs["model"])
        png = plot_pareto(
            found.front,
            found.solutions,
            parent_latency_ms=found.parent.latency_ms,
            latency_budget_ms=budget.latency_budget_ms,
            path=Path(tmp) / "p.png",
        )
        plots = {"pareto": store.put(png, phase.uri("pareto.png"))}
    store.write_json(outputs["block_library"], block_library_json(library, bld, scores, costs, inputs.model))
    store.write_json(
        outputs["solutions"],
        solutions_json(library, found.solutions, found.front, found.parent, budget.latency_budget_ms),
    )
    result = StageResult(outputs=outputs, digests=digests, plots=plots)
    if "ffn_fusion" in outputs:  # copied into the stage's MLflow run: the runs, their layers, widths and KL
        result.reports["ffn_fusion"] = outputs["ffn_fusion"]
    return result


def _report_fusion(
    result: StageResult, child: Child, costs: CostTable, found: Search, budget: Budget, *, in_search: bool
) -> None:
    """Tag the fusion and add the cost model's prediction for the fused child; with ``in_search``, the MIP's saving,
    and a warning when the KL budget left a run unfused that the search counted as fused."""
    result.tags["ffn_fusion"] = child.fusion_summary
    # the cost model's prediction for the exported (fused) child; child_latency_ms stays the MIP's (unfused, or
    # with nas.ffn_fusion.in_search the MIP's own figure for the child with every run fused)
    fused_latency = costs.predicted_config(child.model.config)
    fused_ms = fused_latency.request_ms(costs.decode_tokens)
    result.metrics.update(
        child_latency_ms_fused=fused_ms,
        child_prefill_ms_fused=fused_latency.prefill_ms,
        child_decode_ms_fused=fused_latency.decode_ms,
        speedup_fused=found.parent.latency_ms / fused_ms,
    )
    if not in_search:
        return
    budget_ms = budget.latency_budget_ms
    result.metrics.update(
        mip_fusion_saving_ms=budget.fixed["fusion_saving_ms"],
        mip_num_ffn_merges=float(found.solutions[0].num_ffn_merges),
    )
    left = [f"{r['start']}-{r['stop'] - 1}" for r in child.fusion_report["runs"] if not r["fused"]]
    if left and fused_ms > budget_ms * (1 + 1e-6):
        log.warning(
            "nas: the fused child is predicted at %.2f ms, over the %.2f ms budget the search met by counting "
            "every run fused: nas.ffn_fusion.kl_budget left runs %s unfused (ffn_fusion.json); raise it",
            fused_ms,
            budget_ms,
            ", ".join(left),
        )
