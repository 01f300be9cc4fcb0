"""The nas stage's reports: its metrics, ``block_library.json`` (NVlabs/puzzle layout) and ``solutions.json``."""

from __future__ import annotations

from nemoforge.config import Recipe
from nemoforge.models.block_configs import count_params, kv_cache_bytes_per_token, summarize
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM
from nemoforge.stages.nas.bld import BLDResult
from nemoforge.stages.nas.child import Child
from nemoforge.stages.nas.cost import CostTable
from nemoforge.stages.nas.library import BlockLibrary, Variant
from nemoforge.stages.nas.mip import Solution
from nemoforge.stages.nas.scoring import ParentPass
from nemoforge.stages.nas.search import Search


def child_metrics(
    recipe: Recipe,
    model: DeciLMForCausalLM,
    child: Child,
    library: BlockLibrary,
    costs: CostTable,
    found: Search,
    bld: list[dict[int, BLDResult]],
    heldout: ParentPass,
    budget_ms: float,
) -> dict[str, float]:
    """The stage's metrics but its timings and fusion's: parent and child latency (predicted and measured), speedup,
    params, KV bytes per token, the exported child's held-out KL and LM loss, MIP and BLD figures."""
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
        "params_child": float(count_params(child.model.config)),
        "kv_bytes_per_token_parent": float(kv_cache_bytes_per_token(model.config, kv_bytes)),
        "kv_bytes_per_token_child": float(kv_cache_bytes_per_token(child.model.config, kv_bytes)),
        "kl_div_heldout": child.kl_div_heldout,
        "kl_div_predicted": solutions[0].kl_div,
        "lm_loss_heldout": child.lm_loss_heldout,
        "lm_loss_heldout_parent": heldout.lm_loss,
        "mip_solve_time_s": sum(s.solve_time_s for s in solutions),
        "num_solutions": float(len(solutions)),
        "bld_loss_init_mean": _mean(r.loss_init for layer in bld for r in layer.values()),
        "bld_loss_final_mean": _mean(r.loss_final for layer in bld for r in layer.values()),
    }


def solutions_json(
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


def block_library_json(
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


def mean_curve(curves: list[list[float]]) -> list[tuple[int, float]]:
    """Step-wise mean of several loss curves of equal length: ``[(step, mean), ...]`` (steps from 1)."""
    if not curves or not curves[0]:
        return []
    return [(step + 1, _mean(c[step] for c in curves)) for step in range(len(curves[0]))]
