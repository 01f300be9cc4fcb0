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

Outputs under ``output_uri``: ``model/`` (the child checkpoint), ``block_library.json`` (NVlabs/puzzle layout
with a measurement header), ``solutions.json``, ``pareto.png``, and the resumable phase results ``bld/``
(trained FFN weights per layer), ``scores/`` (per layer) and ``costs.json``; with fusion on, ``ffn_fusion.json``
(the runs, their layers, widths and KL, and the held-out KL to the parent before and after). Each phase result carries a key
of the recipe's nas section, the dtype and the inputs, and is reused on a re-run only when the key matches, so an
interrupted stage resumes from the last finished layer of the phase it was in. Fusion runs after the phases and
is not part of the key, so turning it on or changing its budget reuses them all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nemoforge.artifacts.digests import digest_path
from nemoforge.artifacts.store import ArtifactStore
from nemoforge.artifacts.uris import join_uri, relative_uri
from nemoforge.config import NASConfig, Recipe
from nemoforge.data.corpus import CorpusSplits, load_corpus
from nemoforge.models.block_configs import count_params, kv_cache_bytes_per_token, summarize
from nemoforge.models.convert import child_from_parent, load_causal_lm
from nemoforge.models.export import export_checkpoint
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM, DeciLMMLP
from nemoforge.runtime import compute_device, no_progress, recipe_dtype, seed_for
from nemoforge.stages.nas.bld import BLDResult, distill_layer, parent_activations
from nemoforge.stages.nas.cost import CostTable, device_name, measure_costs
from nemoforge.stages.nas.fusion import ffn_fusion
from nemoforge.stages.nas.library import BlockLibrary, Variant, build_library
from nemoforge.stages.nas.mip import Option, Solution, check_budgets, evaluate, pareto_front, search
from nemoforge.stages.nas.plots import plot_pareto
from nemoforge.stages.nas.scoring import (
    ParentPass,
    parent_pass,
    score_layer,
    variant_layer_output,
)
from nemoforge.stages.result import DatasetRef, StageResult

log = logging.getLogger(__name__)

PARETO_POINTS = 12


@dataclass(frozen=True)
class _Phase:
    """Where the stage keeps its resumable results, and the key that says whether they are still valid."""

    store: ArtifactStore
    output_uri: str
    key: str

    def uri(self, *parts: str) -> str:
        return join_uri(self.output_uri, *parts)

    def read(self, *parts: str) -> dict | None:
        """The JSON at ``parts`` when it exists and carries this run's key."""
        uri = self.uri(*parts)
        if not self.store.exists(uri):
            return None
        data = self.store.read_json(uri)
        return data if data.get("key") == self.key else None

    def write(self, data: dict, *parts: str) -> None:
        self.store.write_json(self.uri(*parts), {**data, "key": self.key})


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
    inputs = _load_inputs(recipe, parent_uri=parent_uri, corpus_uri=corpus_uri, output_uri=output_uri, store=store)
    model, tokenizer, library, phase = inputs.model, inputs.tokenizer, inputs.library, inputs.phase
    corpus = inputs.corpus

    # Cost first: it takes seconds and tells whether the budgets can be met before BLD and scoring run.
    t = time.perf_counter()
    costs = _cost_phase(model, library, recipe, phase)
    budget = _budget(library, costs, nas)
    timings["time_cost_s"] = time.perf_counter() - t

    t = time.perf_counter()
    bld = _bld_phase(model, library, inputs.calibration_ids, recipe, phase)
    narrow_mlps = [{w: r.mlp(model) for w, r in layer.items()} for layer in bld]
    timings["time_bld_s"] = time.perf_counter() - t

    t = time.perf_counter()
    heldout = parent_pass(model, inputs.heldout_ids)
    scores = _scoring_phase(model, library, heldout, narrow_mlps, phase)
    timings["time_scoring_s"] = time.perf_counter() - t

    t = time.perf_counter()
    found = _mip_phase(library, costs, scores, nas, budget)
    timings["time_mip_s"] = time.perf_counter() - t
    solutions, front, parent, chosen = found.solutions, found.front, found.parent, found.chosen
    budget_ms = budget.latency_budget_ms

    t = time.perf_counter()
    child = build_child(model, library, chosen, narrow_mlps)
    with torch.no_grad():
        child_kl, child_lm_loss = heldout.score(child(heldout.input_ids_NT).logits)
    outputs = {
        "model": phase.uri("model"),
        "block_library": phase.uri("block_library.json"),
        "solutions": phase.uri("solutions.json"),
        "bld": phase.uri("bld"),
    }
    fusion_metrics = {}
    if nas.ffn_fusion.enabled:
        child, fusion_metrics = _fusion_step(
            child, heldout, nas.ffn_fusion.kl_budget, child_kl, child_lm_loss
        )
        child_kl, child_lm_loss = fusion_metrics["kl_div_heldout"], fusion_metrics["lm_loss_heldout"]
        outputs["ffn_fusion"] = phase.uri("ffn_fusion.json")
        fusion_report = fusion_metrics.pop("report")
        store.write_json(outputs["ffn_fusion"], fusion_report)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_checkpoint(child, tokenizer, Path(tmp) / "model")
        digests = {"model": digest_path(model_dir)}
        store.put(model_dir, outputs["model"])
        png = plot_pareto(
            front,
            solutions,
            parent_latency_ms=parent.latency_ms,
            latency_budget_ms=budget_ms,
            path=Path(tmp) / "p.png",
        )
        plots = {"pareto": store.put(png, phase.uri("pareto.png"))}
    store.write_json(outputs["block_library"], _block_library_json(library, bld, scores, costs, model))
    store.write_json(outputs["solutions"], _solutions_json(library, solutions, front, parent, budget_ms))
    result = StageResult(outputs=outputs, digests=digests, plots=plots)
    if "ffn_fusion" in outputs:  # copied into the stage's MLflow run: the runs, their layers, widths and KL
        result.reports["ffn_fusion"] = outputs["ffn_fusion"]
    timings["time_export_s"] = time.perf_counter() - t
    timings["wall_time_s"] = time.perf_counter() - started

    result.metrics.update(
        _child_metrics(recipe, model, child, library, costs, found, bld, heldout, child_kl, child_lm_loss, budget_ms)
    )
    result.metrics.update({k: v for k, v in fusion_metrics.items() if k != "summary"})
    result.metrics.update(timings)
    result.history["bld_loss"] = _mean_curve([r.losses for layer in bld for r in layer.values()])
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
            "block_configs": summarize(child.config.block_configs, library.hidden_size),
            "device": costs.measurement["device"],
        }
    )
    if fusion_metrics:
        result.tags["ffn_fusion"] = fusion_metrics["summary"]
        # the cost model's prediction for the exported (fused) child; child_latency_ms stays the MIP's (unfused, or
        # with nas.ffn_fusion.in_search the MIP's own figure for the child with every run fused)
        fused_latency = costs.predicted_config(child.config)
        fused_ms = fused_latency.request_ms(costs.decode_tokens)
        result.metrics.update(
            child_latency_ms_fused=fused_ms,
            child_prefill_ms_fused=fused_latency.prefill_ms,
            child_decode_ms_fused=fused_latency.decode_ms,
            speedup_fused=parent.latency_ms / fused_ms,
        )
    if nas.ffn_fusion.in_search:
        result.metrics.update(
            mip_fusion_saving_ms=budget.fixed["fusion_saving_ms"],
            mip_num_ffn_merges=float(solutions[0].num_ffn_merges),
        )
        left = [f"{r['start']}-{r['stop'] - 1}" for r in fusion_report["runs"] if not r["fused"]]
        if left and fused_ms > budget_ms * (1 + 1e-6):
            log.warning(
                "nas: the fused child is predicted at %.2f ms, over the %.2f ms budget the search met by counting "
                "every run fused: nas.ffn_fusion.kl_budget left runs %s unfused (ffn_fusion.json); raise it",
                fused_ms,
                budget_ms,
                ", ".join(left),
            )
    log.info(
        "nas: child %s, predicted latency %.1f of %.1f ms (x%.2f), held-out KL %.4f",
        result.tags["block_configs"],
        solutions[0].latency_ms,
        parent.latency_ms,
        result.metrics["speedup"],
        child_kl,
    )
    return result


# ------------------------------------------------------------------------------------------------ phases
@dataclass(frozen=True)
class NASInputs:
    """What every phase works on: the parent on the compute device, its tokenizer, the corpus, the block library,
    the phase store (keyed), and the calibration (BLD) and held-out (scoring) token rows on the model's device."""

    model: DeciLMForCausalLM
    tokenizer: Any
    corpus: CorpusSplits
    library: BlockLibrary
    phase: _Phase
    calibration_ids: torch.Tensor
    heldout_ids: torch.Tensor


def _load_inputs(
    recipe: Recipe, *, parent_uri: str, corpus_uri: str, output_uri: str, store: ArtifactStore
) -> NASInputs:
    """Fetch and load the parent and the corpus, build the block library, and key the phase results.

    Raises:
        InputNotFoundError: the parent or corpus URI does not exist.
        RecipeError: an FFN width not below the parent's.
    """
    nas = recipe.nas
    parent_dir = store.fetch(parent_uri)
    # on the pod's GPU when it has one: BLD, scoring and cost timing all run there
    model = load_causal_lm(parent_dir, dtype=recipe_dtype(recipe)).to(compute_device())
    tokenizer = AutoTokenizer.from_pretrained(parent_dir)
    corpus = load_corpus(store.fetch(corpus_uri))
    library = build_library(model.config, nas)
    key_source = {
        "nas": nas.model_dump(mode="json", exclude={"ffn_fusion"}),
        "dtype": recipe.dtype,
        "parent": relative_uri(parent_uri, store.root_uri),  # a moved workdir resumes its phases
        "corpus": corpus.digest,
    }
    phase = _Phase(
        store, output_uri, hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()
    )

    calibration_ids = corpus.train_ids_NT[: nas.bld.num_calibration_sequences].to(model.device)
    heldout_ids = corpus.heldout_ids_NT[: nas.scoring.num_sequences, : nas.scoring.seq_len_tokens].to(model.device)
    return NASInputs(model, tokenizer, corpus, library, phase, calibration_ids, heldout_ids)


@dataclass(frozen=True)
class Budget:
    """The MIP's constraints: the parent's choice per layer, the cost terms outside the per-variant costs
    (``fixed_latency_ms``, ``fixed_memory_bytes``, and ``fusion_saving_ms``: the latency saved per FFN merged by FFN
    Fusion when ``nas.ffn_fusion.in_search``, else 0), the recipe's budgets (``latency_budget_ratio``,
    ``memory_budget_gib``) and the latency budget they give in ms."""

    parent_choice: list[int]
    fixed: dict[str, float]
    budgets: dict[str, float | None]
    latency_budget_ms: float


def _budget(library: BlockLibrary, costs: CostTable, nas: NASConfig) -> Budget:
    """The budgets of the search, checked against the cost table before BLD and scoring run.

    Raises:
        RecipeError: a budget no child meets (names the field and the smallest feasible value).
    """
    parent_choice = [row.index(library.parent) for row in library.variants]
    in_search = nas.ffn_fusion.in_search
    fixed = {
        "fixed_latency_ms": costs.fixed.request_ms(costs.decode_tokens),
        "fixed_memory_bytes": costs.fixed_param_bytes,
        "fusion_saving_ms": costs.fusion_saving().request_ms(costs.decode_tokens) if in_search else 0.0,
    }
    budgets = {"latency_budget_ratio": nas.latency_budget_ratio, "memory_budget_gib": nas.memory_budget_gib}
    budget_ms, _ = check_budgets(_options(library, costs), parent_choice=parent_choice, **budgets, **fixed)
    return Budget(parent_choice, fixed, budgets, budget_ms)


@dataclass(frozen=True)
class Search:
    """The MIP's answer: ``solutions`` (best first), the Pareto ``front`` of (ratio, solution), the ``parent``
    evaluated as a solution, and the variant per layer of solution 1 (``chosen``)."""

    solutions: list[Solution]
    front: list[tuple[float, Solution]]
    parent: Solution
    chosen: list[Variant]


def _mip_phase(
    library: BlockLibrary,
    costs: CostTable,
    scores: list[dict[Variant, dict[str, float]]],
    nas: NASConfig,
    budget: Budget,
) -> Search:
    """N diverse solutions under the budgets and a Pareto sweep over latency ratios (Puzzle §4.2, App. B)."""
    options = _options(library, costs, scores)
    solutions = search(
        options,
        parent_choice=budget.parent_choice,
        num_solutions=nas.num_solutions,
        min_diversity_layers=nas.min_diversity_layers,
        time_limit_s=nas.mip_time_limit_s,
        **budget.budgets,
        **budget.fixed,
    )
    front = pareto_front(
        options,
        parent_choice=budget.parent_choice,
        memory_budget_gib=nas.memory_budget_gib,
        num_points=PARETO_POINTS,
        time_limit_s=nas.mip_time_limit_s,
        **budget.fixed,
    )
    parent = evaluate(options, budget.parent_choice, **budget.fixed)  # all attention: nothing to fuse
    chosen = [library.variants[i][j] for i, j in enumerate(solutions[0].choice)]
    return Search(solutions, front, parent, chosen)


def _options(
    library: BlockLibrary, costs: CostTable, scores: list[dict[Variant, dict[str, float]]] | None = None
) -> list[list[Option]]:
    """The MIP's view of the library: per layer, per variant, (KL, request latency, parameter + KV bytes)."""
    return [
        [
            Option(
                kl_div=scores[i][v]["kl_div"] if scores else 0.0,
                latency_ms=costs.latency(v).request_ms(costs.decode_tokens),
                memory_bytes=costs.param_bytes(v) + costs.kv_cache_bytes(v),
                attention_no_op=v.attention_no_op,
                ffn_no_op=not v.ffn_size,
            )
            for v in row
        ]
        for i, row in enumerate(library.variants)
    ]


def _bld_phase(
    model: DeciLMForCausalLM,
    library: BlockLibrary,
    calibration_ids: torch.Tensor,
    recipe: Recipe,
    phase: _Phase,
) -> list[dict[int, BLDResult]]:
    """Per layer, the BLD-trained narrow FFNs; layers finished by an earlier run are read back from ``bld/``."""
    cfg = recipe.nas.bld
    results: list[dict[int, BLDResult] | None] = [None] * library.num_layers
    for i in range(library.num_layers):
        meta = phase.read("bld", f"layer-{i:03d}.json")
        if meta is not None:
            tensors = load_file(phase.store.fetch(phase.uri("bld", f"layer-{i:03d}.safetensors")))
            results[i] = {
                int(w): BLDResult(
                    state={
                        k.split(".", 1)[1]: v
                        for k, v in tensors.items()
                        if k.startswith(f"{w}.") and "channels" not in k
                    },
                    channels=tensors[f"{w}.channels"],
                    loss_init=m["loss_init"],
                    loss_final=m["loss_final"],
                    losses=m["losses"],
                )
                for w, m in meta["widths"].items()
            }
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        log.info(
            "nas: BLD of %d layers x %d widths on %d calibration tokens",
            len(todo),
            len(library.ffn_sizes),
            calibration_ids.numel(),
        )
        stream = parent_activations(model, calibration_ids)
        for acts in tqdm(stream, total=todo[-1] + 1, desc="nas: BLD", unit="layer", disable=no_progress()):
            i = acts.layer_idx
            if results[i] is None:
                results[i] = distill_layer(
                    model,
                    acts,
                    library.ffn_sizes,
                    steps=cfg.steps,
                    batch_tokens=cfg.batch_tokens,
                    lr=cfg.lr,
                    seed=seed_for(recipe, "nas.bld"),
                )
                _save_bld_layer(phase, i, results[i])
            if i == todo[-1]:
                break
    return results


def _save_bld_layer(phase: _Phase, layer_idx: int, results: dict[int, BLDResult]) -> None:
    tensors = {}
    for width, r in results.items():
        tensors.update({f"{width}.{k}": v.contiguous() for k, v in r.state.items()})
        tensors[f"{width}.channels"] = r.channels
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer.safetensors"
        save_file(tensors, path)
        phase.store.put(path, phase.uri("bld", f"layer-{layer_idx:03d}.safetensors"))
    widths = {
        str(w): {"loss_init": r.loss_init, "loss_final": r.loss_final, "losses": r.losses}
        for w, r in results.items()
    }
    # Written last: its presence marks the layer done.
    phase.write({"widths": widths}, "bld", f"layer-{layer_idx:03d}.json")


def _scoring_phase(
    model: DeciLMForCausalLM,
    library: BlockLibrary,
    heldout: ParentPass,
    narrow_mlps: list[dict[int, DeciLMMLP]],
    phase: _Phase,
) -> list[dict[Variant, dict[str, float]]]:
    """Per layer, per variant, ``{"kl_div", "lm_loss"}`` (replace-1-block, Puzzle §4.2); resumable per layer."""
    scores = []
    for i in tqdm(range(library.num_layers), desc="nas: scoring", unit="layer", disable=no_progress()):
        saved = phase.read("scores", f"layer-{i:03d}.json")
        if saved is None:
            variants = [v for v in library.variants[i] if not library.is_parent(v)]
            outputs = [variant_layer_output(model, heldout, i, v, narrow_mlps[i]) for v in variants]
            layer_scores = score_layer(model, heldout, i, outputs)
            saved = {
                "variants": [
                    {
                        "attention_no_op": v.attention_no_op,
                        "ffn_size": v.ffn_size,
                        "kl_div": kl,
                        "lm_loss": lm,
                    }
                    for v, (kl, lm) in zip(variants, layer_scores, strict=True)
                ]
            }
            phase.write(saved, "scores", f"layer-{i:03d}.json")
        row = {library.parent: {"kl_div": 0.0, "lm_loss": heldout.lm_loss}}
        for s in saved["variants"]:
            row[Variant(s["attention_no_op"], s["ffn_size"])] = {
                "kl_div": s["kl_div"],
                "lm_loss": s["lm_loss"],
            }
        scores.append(row)
    return scores


def _cost_phase(model: DeciLMForCausalLM, library: BlockLibrary, recipe: Recipe, phase: _Phase) -> CostTable:
    """The cost table, timed where the model is (the pod's GPU when it has one: the target device), else on its CPU.

    A saved table is reused only when it was measured on the same device.
    """
    saved = phase.read("costs.json")
    if saved is not None and saved["measurement"]["device"] == device_name(model.device):
        return CostTable.from_json(saved)
    log.info("nas: timing sub-blocks on %s", device_name(model.device))
    costs = measure_costs(model, library, recipe.nas.cost)
    phase.write(costs.to_json(), "costs.json")
    return costs


# ------------------------------------------------------------------------------------------------- child
def _fusion_step(
    child: DeciLMForCausalLM, heldout: ParentPass, kl_budget: float, kl_before: float, lm_loss_before: float
) -> tuple[DeciLMForCausalLM, dict]:
    """FFN Fusion of the chosen child (``fusion.ffn_fusion``) on the held-out scoring sequences.

    Returns:
        The (possibly unchanged) child and a dict of metrics: ``kl_div_heldout`` / ``lm_loss_heldout`` after fusion,
        ``kl_div_heldout_unfused`` / ``lm_loss_heldout_unfused`` before, ``ffn_fusion_num_runs_fused``,
        ``ffn_fusion_layers_removed``, ``ffn_fusion_kl_div_vs_unfused``; plus ``report`` (the JSON written as
        ``ffn_fusion.json``, with the KL to the parent before/after) and ``summary`` (a one-line tag).
    """
    fused, report = ffn_fusion(child, heldout.input_ids_NT, kl_budget)
    kl_after, lm_loss_after = kl_before, lm_loss_before
    if fused is not child:
        with torch.no_grad():
            kl_after, lm_loss_after = heldout.score(fused(heldout.input_ids_NT).logits)
    report.update(
        kl_div_heldout_before=kl_before,
        kl_div_heldout_after=kl_after,
        lm_loss_heldout_before=lm_loss_before,
        lm_loss_heldout_after=lm_loss_after,
    )
    runs = [r for r in report["runs"] if r["fused"]]
    summary = "; ".join(
        f"layers {r['start']}-{r['stop'] - 1} -> {r['fused_layer']} (ffn {'+'.join(map(str, r['widths']))}"
        f" = {r['fused_width']})"
        for r in runs
    )
    return fused, {
        "kl_div_heldout": kl_after,
        "lm_loss_heldout": lm_loss_after,
        "kl_div_heldout_unfused": kl_before,
        "lm_loss_heldout_unfused": lm_loss_before,
        "ffn_fusion_num_runs_fused": float(len(runs)),
        "ffn_fusion_layers_removed": float(report["num_layers_before"] - report["num_layers_after"]),
        "ffn_fusion_kl_div_vs_unfused": report["kl_div_fused_vs_child"],
        "report": report,
        "summary": summary or report["status"],
    }


@torch.no_grad()
def build_child(
    parent: DeciLMForCausalLM,
    library: BlockLibrary,
    chosen: list[Variant],
    narrow_mlps: list[dict[int, DeciLMMLP]],
) -> DeciLMForCausalLM:
    """The child of one solution: the parent's embeddings, head and attention; BLD-trained narrow FFNs; no_op
    sub-blocks absent (no modules, no weights)."""
    child = child_from_parent(parent, [library.block_config(v) for v in chosen])
    for i, variant in enumerate(chosen):
        if variant.ffn_size and variant.ffn_size != library.parent_ffn_size:
            child.model.layers[i].mlp.load_state_dict(narrow_mlps[i][variant.ffn_size].state_dict())
    return child.eval()


# ----------------------------------------------------------------------------------------------- outputs
def _child_metrics(
    recipe: Recipe,
    model: DeciLMForCausalLM,
    child: DeciLMForCausalLM,
    library: BlockLibrary,
    costs: CostTable,
    found: Search,
    bld: list[dict[int, BLDResult]],
    heldout: ParentPass,
    child_kl: float,
    child_lm_loss: float,
    budget_ms: float,
) -> dict[str, float]:
    """The stage's metrics but its timings: parent and child latency (predicted and measured), speedup, params,
    KV bytes per token, the child's held-out KL and LM loss, MIP and BLD figures."""
    solutions, parent = found.solutions, found.parent
    child_latency = costs.predicted(found.chosen)
    parent_latency = costs.predicted([library.parent] * library.num_layers)
    kv_bytes = recipe.nas.cost.kv_bytes
    return {
        "parent_latency_ms": parent.latency_ms,
        "parent_latency_ms_measured": costs.parent_measured.request_ms(costs.decode_tokens),
        "parent_prefill_ms": parent_latency.prefill_ms,
        "parent_prefill_ms_measured": costs.parent_measured.prefill_ms,
        "parent_decode_ms": parent_latency.decode_ms,
        "parent_decode_ms_measured": costs.parent_measured.decode_ms,
        "child_latency_ms": solutions[0].latency_ms,
        "child_prefill_ms": child_latency.prefill_ms,
        "child_decode_ms": child_latency.decode_ms,
        "latency_budget_ms": budget_ms,
        "speedup": parent.latency_ms / solutions[0].latency_ms,
        "params_parent": float(count_params(model.config)),
        "params_child": float(count_params(child.config)),
        "kv_bytes_per_token_parent": float(kv_cache_bytes_per_token(model.config, kv_bytes)),
        "kv_bytes_per_token_child": float(kv_cache_bytes_per_token(child.config, kv_bytes)),
        "kl_div_heldout": child_kl,
        "kl_div_predicted": solutions[0].kl_div,
        "lm_loss_heldout": child_lm_loss,
        "lm_loss_heldout_parent": heldout.lm_loss,
        "mip_solve_time_s": sum(s.solve_time_s for s in solutions),
        "num_solutions": float(len(solutions)),
        "bld_loss_init_mean": _mean(r.loss_init for layer in bld for r in layer.values()),
        "bld_loss_final_mean": _mean(r.loss_final for layer in bld for r in layer.values()),
    }


def _solutions_json(
    library: BlockLibrary,
    solutions: list[Solution],
    front: list[tuple[float, Solution]],
    parent: Solution,
    budget_ms: float,
) -> dict:
    return {
        "latency_budget_ms": budget_ms,
        "parent": _solution_json(library, parent, parent),
        "solutions": [_solution_json(library, s, parent) for s in solutions],
        "pareto": [{"ratio": r, **_solution_json(library, s, parent)} for r, s in front],
    }


def _block_library_json(
    library: BlockLibrary,
    bld: list[dict[int, BLDResult]],
    scores: list[dict[Variant, dict[str, float]]],
    costs: CostTable,
    parent_model: DeciLMForCausalLM,
) -> dict:
    """NVlabs/puzzle's block-library layout (recipe.md §4.1) with a measurement header and per-variant BLD losses."""
    decode_tokens = costs.decode_tokens
    layers = {}
    for i, row in enumerate(library.variants):
        layers[str(i)] = {}
        for v in row:
            trained = bld[i].get(v.ffn_size)  # narrow widths only
            layers[str(i)][library.name(v)] = {
                "block_config": library.block_config(v).to_dict(),
                "stats": {
                    "latency_ms": costs.latency(v).report(decode_tokens),
                    "param_bytes": costs.param_bytes(v),
                    "kv_cache_bytes": costs.kv_cache_bytes(v),
                },
                "metrics": scores[i][v],
                "bld": trained and {"loss_init": trained.loss_init, "loss_final": trained.loss_final},
            }
    return {
        "measurement": {**costs.measurement, "latency_unit": "ms", "memory_unit": "bytes"},
        "parent": {
            "num_layers": library.num_layers,
            "hidden_size": library.hidden_size,
            "num_kv_heads": library.num_kv_heads,
            "ffn_size": library.parent_ffn_size,
            "params": count_params(parent_model.config),
            "latency_ms": {
                "predicted": costs.predicted([library.parent] * library.num_layers).report(decode_tokens),
                "measured": costs.parent_measured.report(decode_tokens),
            },
        },
        "fixed": {"latency_ms": costs.fixed.report(decode_tokens), "param_bytes": costs.fixed_param_bytes},
        "layers": layers,
    }


def _solution_json(library: BlockLibrary, solution: Solution, parent: Solution) -> dict:
    variants = [library.variants[i][j] for i, j in enumerate(solution.choice)]
    return {
        "summary": summarize([library.block_config(v) for v in variants], library.hidden_size),
        "kl_div": solution.kl_div,
        "latency_ms": solution.latency_ms,
        "speedup": parent.latency_ms / solution.latency_ms,
        "memory_bytes": solution.memory_bytes,
        "solve_time_s": solution.solve_time_s,
        "num_ffn_merges": solution.num_ffn_merges,
        "layers": [library.name(v) for v in variants],
        "block_configs": [library.block_config(v).to_dict() for v in variants],
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _mean_curve(curves: list[list[float]]) -> list[tuple[int, float]]:
    """Step-wise mean of several loss curves of equal length: ``[(step, mean), ...]`` (steps from 1)."""
    if not curves or not curves[0]:
        return []
    return [(step + 1, _mean(c[step] for c in curves)) for step in range(len(curves[0]))]
