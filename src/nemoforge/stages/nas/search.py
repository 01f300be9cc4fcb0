"""The search phase (Puzzle §4.2, App. B): the budgets checked against the cost table, then the MIP solved.

The budgets are checked first, right after the cost phase, so that a budget no child meets fails before BLD and
scoring run; the MIP (:mod:`~nemoforge.stages.nas.mip`) then picks N diverse solutions and sweeps a Pareto front.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemoforge.config import NASConfig
from nemoforge.stages.nas.cost import CostTable
from nemoforge.stages.nas.library import BlockLibrary, Variant
from nemoforge.stages.nas.mip import Option, Solution, check_budgets, evaluate, pareto_front, search

PARETO_POINTS = 12


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


def check_budget(library: BlockLibrary, costs: CostTable, nas: NASConfig) -> Budget:
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
    budget_ms, _ = check_budgets(mip_options(library, costs), parent_choice=parent_choice, **budgets, **fixed)
    return Budget(parent_choice, fixed, budgets, budget_ms)


@dataclass(frozen=True)
class Search:
    """The MIP's answer: ``solutions`` (best first), the Pareto ``front`` of (ratio, solution), the ``parent``
    evaluated as a solution, and the variant per layer of solution 1 (``chosen``)."""

    solutions: list[Solution]
    front: list[tuple[float, Solution]]
    parent: Solution
    chosen: list[Variant]


def mip_phase(
    library: BlockLibrary,
    costs: CostTable,
    scores: list[dict[Variant, dict[str, float]]],
    nas: NASConfig,
    budget: Budget,
) -> Search:
    """N diverse solutions under the budgets and a Pareto sweep over latency ratios (Puzzle §4.2, App. B)."""
    options = mip_options(library, costs, scores)
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


def mip_options(
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
