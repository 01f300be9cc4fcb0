"""Mixed-integer program that picks one block variant per layer (Puzzle §4.2 and App. B, arXiv 2411.19146).

Binary ``x[i, j]`` = layer ``i`` uses variant ``j`` of its block library row:

    minimize    sum_ij kl_div[i, j] * x[i, j]                         (replace-1-block KL, Puzzle §4.2)
    subject to  sum_j x[i, j] = 1                        for every layer i
                fixed_latency + sum_ij latency[i, j] * x[i, j] <= latency_max     (ms per request)
                fixed_memory  + sum_ij memory[i, j]  * x[i, j] <= memory_max      (bytes, when given)
                sum_i x[i, y_i] <= L - d                 for every earlier solution y (diversity)

Solved with HiGHS through ``scipy.optimize.milp``. The diversity row is NVlabs/puzzle's ``minimal_diversity``:
each new solution differs from every earlier one in at least ``d`` layers. ``search`` turns the recipe's
budgets into these constraints and raises :class:`~nemoforge.errors.RecipeError` with the smallest feasible
budget when a budget cannot be met; ``pareto_front`` re-solves over a sweep of latency budgets.

Shape legend: L layers, V_i variants of layer i (rows may differ in length).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from nemoforge.errors import RecipeError

GIB = 2**30
# Slack on budgets, so that a child exactly at the budget (e.g. ratio 1.0: the parent) is feasible.
_REL_TOL = 1e-9


@dataclass(frozen=True)
class Option:
    """One variant of one layer as the MIP sees it.

    Attributes:
        kl_div: replace-1-block KL(parent || child) in nats per token (0 for the parent variant).
        latency_ms: the variant's share of one request's latency (prefill + decode) in milliseconds.
        memory_bytes: parameter bytes + KV-cache bytes of the variant at the cost profile's batch and length.
    """

    kl_div: float
    latency_ms: float
    memory_bytes: float = 0.0


@dataclass(frozen=True)
class Solution:
    """A chosen architecture.

    Attributes:
        choice: variant index per layer (into that layer's option row).
        kl_div: summed replace-1-block KL of the chosen variants (the objective; nats per token).
        latency_ms: predicted request latency, fixed part included.
        memory_bytes: predicted memory, fixed part included.
        solve_time_s: HiGHS wall time for this solution.
    """

    choice: tuple[int, ...]
    kl_div: float
    latency_ms: float
    memory_bytes: float
    solve_time_s: float


def _flatten(options_LV: Sequence[Sequence[Option]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    kl = np.array([o.kl_div for row in options_LV for o in row], dtype=np.float64)
    latency = np.array([o.latency_ms for row in options_LV for o in row], dtype=np.float64)
    memory = np.array([o.memory_bytes for row in options_LV for o in row], dtype=np.float64)
    offsets = np.cumsum([0] + [len(row) for row in options_LV]).tolist()
    return kl, latency, memory, offsets


def evaluate(
    options_LV: Sequence[Sequence[Option]],
    choice: Sequence[int],
    *,
    fixed_latency_ms: float = 0.0,
    fixed_memory_bytes: float = 0.0,
    solve_time_s: float = 0.0,
) -> Solution:
    """The totals of a given choice (one variant index per layer)."""
    picked = [options_LV[i][j] for i, j in enumerate(choice)]
    return Solution(
        choice=tuple(int(j) for j in choice),
        kl_div=float(sum(o.kl_div for o in picked)),
        latency_ms=fixed_latency_ms + float(sum(o.latency_ms for o in picked)),
        memory_bytes=fixed_memory_bytes + float(sum(o.memory_bytes for o in picked)),
        solve_time_s=solve_time_s,
    )


def solve(
    options_LV: Sequence[Sequence[Option]],
    *,
    latency_max_ms: float,
    memory_max_bytes: float | None = None,
    fixed_latency_ms: float = 0.0,
    fixed_memory_bytes: float = 0.0,
    previous: Sequence[Sequence[int]] = (),
    min_diversity_layers: int = 1,
    time_limit_s: float = 60.0,
) -> Solution | None:
    """The minimum-KL choice under the budgets, differing from each ``previous`` choice in >= d layers.

    Args:
        options_LV: per layer, its variants.
        latency_max_ms: request latency budget (fixed part included).
        memory_max_bytes: memory budget (fixed part included); None = unconstrained.
        fixed_latency_ms, fixed_memory_bytes: cost outside the layers (embedding, final norm, LM head).
        previous: earlier choices the solution must differ from.
        min_diversity_layers: d, capped at L.
        time_limit_s: HiGHS time limit; the best solution found by then is returned.

    Returns:
        The solution, or None when no choice meets the constraints.
    """
    kl, latency, memory, offsets = _flatten(options_LV)
    num_layers, num_vars = len(options_LV), len(kl)
    rows: list[tuple[np.ndarray, float, float]] = []  # (coefficients, lower, upper)
    for i in range(num_layers):
        one_hot = np.zeros(num_vars)
        one_hot[offsets[i] : offsets[i + 1]] = 1.0
        rows.append((one_hot, 1.0, 1.0))
    rows.append((latency, -np.inf, latency_max_ms - fixed_latency_ms + _REL_TOL * abs(latency_max_ms)))
    if memory_max_bytes is not None:
        # In GiB, so that the constraint matrix stays well scaled next to the one-hot rows.
        budget_gib = (memory_max_bytes - fixed_memory_bytes) / GIB + _REL_TOL * memory_max_bytes / GIB
        rows.append((memory / GIB, -np.inf, budget_gib))
    d = min(min_diversity_layers, num_layers)
    for choice in previous:
        same = np.zeros(num_vars)
        for i, j in enumerate(choice):
            same[offsets[i] + j] = 1.0
        rows.append((same, -np.inf, float(num_layers - d)))
    matrix, lower, upper = zip(*rows, strict=True)

    started = time.perf_counter()
    result = milp(
        c=kl,
        integrality=np.ones(num_vars),
        bounds=Bounds(0, 1),
        constraints=LinearConstraint(np.vstack(matrix), lower, upper),
        options={"time_limit": time_limit_s, "mip_rel_gap": 1e-9},
    )
    elapsed = time.perf_counter() - started
    if result.x is None:  # infeasible, or no feasible point found within the time limit
        return None
    x = result.x
    choice = [int(np.argmax(x[offsets[i] : offsets[i + 1]])) for i in range(num_layers)]
    return evaluate(
        options_LV,
        choice,
        fixed_latency_ms=fixed_latency_ms,
        fixed_memory_bytes=fixed_memory_bytes,
        solve_time_s=elapsed,
    )


def diverse_solutions(
    options_LV: Sequence[Sequence[Option]], *, num_solutions: int, min_diversity_layers: int, **budget
) -> list[Solution]:
    """Up to ``num_solutions`` solutions, each differing from all earlier ones in >= ``min_diversity_layers`` layers.

    Fewer come back when the library and budget admit no further diverse solution (Puzzle App. B; NVlabs/puzzle
    ``multi_solution_mip_nas``). ``budget`` holds the keyword arguments of :func:`solve`.
    """
    solutions: list[Solution] = []
    for _ in range(num_solutions):
        found = solve(
            options_LV,
            previous=[s.choice for s in solutions],
            min_diversity_layers=min_diversity_layers,
            **budget,
        )
        if found is None:
            break
        solutions.append(found)
    return solutions


def _ceil(value: float, digits: int = 3) -> float:
    return math.ceil(value * 10**digits - 1e-9) / 10**digits


def check_budgets(
    options_LV: Sequence[Sequence[Option]],
    *,
    parent_choice: Sequence[int],
    fixed_latency_ms: float,
    fixed_memory_bytes: float,
    latency_budget_ratio: float,
    memory_budget_gib: float | None,
) -> tuple[float, float | None]:
    """The recipe's budgets in ms and bytes, checked against the cheapest child of the library (KL is not needed).

    Returns:
        ``(latency_max_ms, memory_max_bytes)``; the latency budget is the ratio times the parent's predicted
        latency, the memory budget None when unconstrained.

    Raises:
        RecipeError: a budget below the cheapest child; the message names the field and its smallest feasible value.
    """
    parent_ms = evaluate(options_LV, parent_choice, fixed_latency_ms=fixed_latency_ms).latency_ms
    latency_max_ms = latency_budget_ratio * parent_ms
    fastest_ms = fixed_latency_ms + sum(min(o.latency_ms for o in row) for row in options_LV)
    if fastest_ms > latency_max_ms * (1 + _REL_TOL):
        min_ratio = fastest_ms / parent_ms
        raise RecipeError(
            f"nas.latency_budget_ratio={latency_budget_ratio} is infeasible: the fastest child in the block library "
            f"takes {fastest_ms:.3f} ms of the parent's {parent_ms:.3f} ms (predicted), so the smallest "
            f"feasible ratio is {min_ratio:.4f}; set nas.latency_budget_ratio >= {_ceil(min_ratio)} or widen the "
            "library (nas.ffn_intermediate_sizes, nas.attention_no_op, nas.ffn_no_op)"
        )
    if memory_budget_gib is None:
        return latency_max_ms, None
    memory_max_bytes = memory_budget_gib * GIB
    smallest = fixed_memory_bytes + sum(min(o.memory_bytes for o in row) for row in options_LV)
    if smallest > memory_max_bytes * (1 + _REL_TOL):
        raise RecipeError(
            f"nas.memory_budget_gib={memory_budget_gib} is infeasible: the smallest child in the block library "
            f"needs {smallest / GIB:.4f} GiB (parameters + KV cache); set nas.memory_budget_gib >= "
            f"{_ceil(smallest / GIB, 4)} or remove it"
        )
    return latency_max_ms, memory_max_bytes


def search(
    options_LV: Sequence[Sequence[Option]],
    *,
    parent_choice: Sequence[int],
    fixed_latency_ms: float,
    fixed_memory_bytes: float,
    latency_budget_ratio: float,
    memory_budget_gib: float | None,
    num_solutions: int,
    min_diversity_layers: int,
    time_limit_s: float,
) -> list[Solution]:
    """The recipe's search: latency budget = ratio x the parent's predicted latency; N diverse solutions.

    Args:
        options_LV: per layer, its variants.
        parent_choice: the parent's variant index per layer (its predicted latency is the budget's reference).
        fixed_latency_ms, fixed_memory_bytes: cost outside the layers.
        latency_budget_ratio: ``nas.latency_budget_ratio``.
        memory_budget_gib: ``nas.memory_budget_gib`` (None = unconstrained).
        num_solutions, min_diversity_layers, time_limit_s: ``nas.num_solutions``, ``nas.min_diversity_layers``,
            ``nas.mip_time_limit_s``.

    Returns:
        1..num_solutions solutions, best (lowest KL) first.

    Raises:
        RecipeError: a budget no child of the library meets (see :func:`check_budgets`), or the two budgets
            together.
    """
    fixed = {"fixed_latency_ms": fixed_latency_ms, "fixed_memory_bytes": fixed_memory_bytes}
    latency_max_ms, memory_max_bytes = check_budgets(
        options_LV,
        parent_choice=parent_choice,
        latency_budget_ratio=latency_budget_ratio,
        memory_budget_gib=memory_budget_gib,
        **fixed,
    )
    solutions = diverse_solutions(
        options_LV,
        num_solutions=num_solutions,
        min_diversity_layers=min_diversity_layers,
        latency_max_ms=latency_max_ms,
        memory_max_bytes=memory_max_bytes,
        time_limit_s=time_limit_s,
        **fixed,
    )
    if not solutions:
        raise RecipeError(
            f"no child meets nas.latency_budget_ratio={latency_budget_ratio} and "
            f"nas.memory_budget_gib={memory_budget_gib} together (each alone is feasible); relax either"
        )
    return solutions


def pareto_front(
    options_LV: Sequence[Sequence[Option]],
    *,
    parent_choice: Sequence[int],
    fixed_latency_ms: float,
    fixed_memory_bytes: float = 0.0,
    memory_budget_gib: float | None = None,
    num_points: int = 12,
    time_limit_s: float = 60.0,
) -> list[tuple[float, Solution]]:
    """Best solution at ``num_points`` latency budget ratios from the fastest feasible child to the parent.

    Returns:
        ``(ratio, solution)`` pairs in increasing ratio; budgets without a solution are skipped.
    """
    fixed = {"fixed_latency_ms": fixed_latency_ms, "fixed_memory_bytes": fixed_memory_bytes}
    parent_ms = evaluate(options_LV, parent_choice, **fixed).latency_ms
    fastest_ms = fixed_latency_ms + sum(min(o.latency_ms for o in row) for row in options_LV)
    memory_max_bytes = None if memory_budget_gib is None else memory_budget_gib * GIB
    front = []
    for ratio in np.linspace(fastest_ms / parent_ms, 1.0, num_points):
        found = solve(
            options_LV,
            latency_max_ms=float(ratio) * parent_ms,
            memory_max_bytes=memory_max_bytes,
            time_limit_s=time_limit_s,
            **fixed,
        )
        if found is not None:
            front.append((float(ratio), found))
    return front
