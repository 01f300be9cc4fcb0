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

Fusion-aware search (``nas.ffn_fusion.in_search``; FFN Fusion, arXiv 2503.18908). FFN Fusion after the search turns
each maximal run of attention-free layers holding k FFNs into one FFN of summed width. The cost model prices an
FFN of width w on the line ``a + b * w`` through the measured widths (``CostTable.ffn_latency``), so fusing the run
saves ``(k - 1) * a``: each FFN merged into an earlier FFN of its run saves ``s = a`` (``fusion_saving_ms``;
exact up to the line's residuals at the run's widths). With ``s != 0`` two continuous variables per layer,
pinned to 0/1 by the binary ``x`` (A_i = 1 when layer i keeps attention, F_i = 1 when it keeps an FFN)::

    c[i] = (1 - A_i) and (F_i or c[i-1])     layer i is attention-free with an FFN at or before it in its run
    z[i] = (1 - A_i) and F_i and c[i-1]      layer i's FFN merges into an earlier one  (c[-1] = 0)

written as the linear upper and lower bounds of those ANDs/ORs, and the latency row becomes
``fixed_latency + sum_ij latency[i, j] * x[i, j] - s * sum_i z[i] <= latency_max``. The objective is unchanged:
fusion's own KL depends on the child and is measured after the search (``fusion.py``).

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
        attention_no_op: the variant has no attention (a fusion-aware search may merge its FFN).
        ffn_no_op: the variant has no FFN.
    """

    kl_div: float
    latency_ms: float
    memory_bytes: float = 0.0
    attention_no_op: bool = False
    ffn_no_op: bool = False


@dataclass(frozen=True)
class Solution:
    """A chosen architecture.

    Attributes:
        choice: variant index per layer (into that layer's option row).
        kl_div: summed replace-1-block KL of the chosen variants (the objective; nats per token).
        latency_ms: predicted request latency, fixed part included (with a fusion saving: after FFN Fusion).
        memory_bytes: predicted memory, fixed part included.
        solve_time_s: HiGHS wall time for this solution.
        num_ffn_merges: FFNs that FFN Fusion merges into an earlier FFN of their run (:func:`ffn_merges`).
    """

    choice: tuple[int, ...]
    kl_div: float
    latency_ms: float
    memory_bytes: float
    solve_time_s: float
    num_ffn_merges: int = 0


def _flatten(options_LV: Sequence[Sequence[Option]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    kl = np.array([o.kl_div for row in options_LV for o in row], dtype=np.float64)
    latency = np.array([o.latency_ms for row in options_LV for o in row], dtype=np.float64)
    memory = np.array([o.memory_bytes for row in options_LV for o in row], dtype=np.float64)
    offsets = np.cumsum([0] + [len(row) for row in options_LV]).tolist()
    return kl, latency, memory, offsets


def ffn_merges(picked: Sequence[Option]) -> int:
    """FFNs that FFN Fusion merges into an earlier FFN of the same run: ``k - 1`` per maximal run of attention-free
    layers holding ``k >= 1`` FFNs (empty layers inside a run belong to it)."""
    merges, carry = 0, False  # carry: the current attention-free run has an FFN so far
    for option in picked:
        if not option.attention_no_op:
            carry = False
        elif not option.ffn_no_op:
            merges += carry
            carry = True
    return merges


def fastest_latency_ms(
    options_LV: Sequence[Sequence[Option]], *, fixed_latency_ms: float, fusion_saving_ms: float = 0.0
) -> float:
    """The least predicted latency of any choice: per layer its fastest variant, or with a fusion saving the exact
    minimum by dynamic programming over (layer, whether the attention-free run so far has an FFN)."""
    best = {False: 0.0, True: math.inf}  # by carry: the least latency of layers 0..i
    for row in options_LV:
        after = {False: math.inf, True: math.inf}
        for carry, so_far in best.items():
            for o in row:
                merged = o.attention_no_op and not o.ffn_no_op and carry
                next_carry = o.attention_no_op and (carry or not o.ffn_no_op)
                cost = so_far + o.latency_ms - (fusion_saving_ms if merged else 0.0)
                after[next_carry] = min(after[next_carry], cost)
        best = after
    return fixed_latency_ms + min(best.values())


def evaluate(
    options_LV: Sequence[Sequence[Option]],
    choice: Sequence[int],
    *,
    fixed_latency_ms: float = 0.0,
    fixed_memory_bytes: float = 0.0,
    fusion_saving_ms: float = 0.0,
    solve_time_s: float = 0.0,
) -> Solution:
    """The totals of a given choice (one variant index per layer); with ``fusion_saving_ms``, the latency after
    FFN Fusion (``fusion_saving_ms`` less per merged FFN, module docstring)."""
    picked = [options_LV[i][j] for i, j in enumerate(choice)]
    merges = ffn_merges(picked)
    return Solution(
        choice=tuple(int(j) for j in choice),
        kl_div=float(sum(o.kl_div for o in picked)),
        latency_ms=fixed_latency_ms + float(sum(o.latency_ms for o in picked)) - fusion_saving_ms * merges,
        memory_bytes=fixed_memory_bytes + float(sum(o.memory_bytes for o in picked)),
        solve_time_s=solve_time_s,
        num_ffn_merges=merges,
    )


def _fusion_rows(
    options_LV: Sequence[Sequence[Option]], offsets: list[int], num_x: int
) -> list[tuple[np.ndarray, float, float]]:
    """The rows that pin ``c[i]`` (column ``num_x + i``) and ``z[i]`` (column ``num_x + L + i``) to the ANDs/ORs of
    the module docstring, given binary ``x`` in columns ``0 .. num_x - 1``."""
    num_layers = len(options_LV)
    num_vars = num_x + 2 * num_layers
    rows = []
    for i, row in enumerate(options_LV):
        kept_attention, kept_ffn, c, z, c_prev = (np.zeros(num_vars) for _ in range(5))
        for k, option in enumerate(row):
            kept_attention[offsets[i] + k] = not option.attention_no_op
            kept_ffn[offsets[i] + k] = not option.ffn_no_op
        c[num_x + i] = z[num_x + num_layers + i] = 1.0
        if i:
            c_prev[num_x + i - 1] = 1.0
        A, F = kept_attention, kept_ffn
        rows += [
            (c + A, -np.inf, 1.0),  # c <= 1 - A
            (c - F - c_prev, -np.inf, 0.0),  # c <= F + c_prev
            (c - F + A, 0.0, np.inf),  # c >= F - A
            (c - c_prev + A, 0.0, np.inf),  # c >= c_prev - A
            (z + A, -np.inf, 1.0),  # z <= 1 - A
            (z - F, -np.inf, 0.0),  # z <= F
            (z - c_prev, -np.inf, 0.0),  # z <= c_prev
            (z - F - c_prev + A, -1.0, np.inf),  # z >= F + c_prev - A - 1
        ]
    return rows


def solve(
    options_LV: Sequence[Sequence[Option]],
    *,
    latency_max_ms: float,
    memory_max_bytes: float | None = None,
    fixed_latency_ms: float = 0.0,
    fixed_memory_bytes: float = 0.0,
    fusion_saving_ms: float = 0.0,
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
        fusion_saving_ms: latency saved per FFN that FFN Fusion merges into an earlier FFN of its run; 0 = a
            search blind to fusion (module docstring).
        previous: earlier choices the solution must differ from.
        min_diversity_layers: d, capped at L.
        time_limit_s: HiGHS time limit; the best solution found by then is returned.

    Returns:
        The solution, or None when no choice meets the constraints.
    """
    kl, latency, memory, offsets = _flatten(options_LV)
    num_layers, num_x = len(options_LV), len(kl)
    num_vars = num_x + (2 * num_layers if fusion_saving_ms else 0)  # x, then c and z (module docstring)

    def padded(coef_x: np.ndarray, coef_z: float = 0.0) -> np.ndarray:
        out = np.zeros(num_vars)
        out[:num_x] = coef_x
        out[num_x + num_layers :] = coef_z  # the z columns, when there are any
        return out

    rows: list[tuple[np.ndarray, float, float]] = []  # (coefficients, lower, upper)
    for i in range(num_layers):
        one_hot = np.zeros(num_x)
        one_hot[offsets[i] : offsets[i + 1]] = 1.0
        rows.append((padded(one_hot), 1.0, 1.0))
    latency_max = latency_max_ms - fixed_latency_ms + _REL_TOL * abs(latency_max_ms)
    rows.append((padded(latency, -fusion_saving_ms), -np.inf, latency_max))
    if memory_max_bytes is not None:
        # In GiB, so that the constraint matrix stays well scaled next to the one-hot rows.
        budget_gib = (memory_max_bytes - fixed_memory_bytes) / GIB + _REL_TOL * memory_max_bytes / GIB
        rows.append((padded(memory / GIB), -np.inf, budget_gib))
    d = min(min_diversity_layers, num_layers)
    for choice in previous:
        same = np.zeros(num_x)
        for i, j in enumerate(choice):
            same[offsets[i] + j] = 1.0
        rows.append((padded(same), -np.inf, float(num_layers - d)))
    if fusion_saving_ms:
        rows += _fusion_rows(options_LV, offsets, num_x)
    matrix, lower, upper = zip(*rows, strict=True)

    started = time.perf_counter()
    result = milp(
        c=padded(kl),
        # c and z are continuous: the binary x pins them to 0 or 1
        integrality=padded(np.ones(num_x)),
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
        fusion_saving_ms=fusion_saving_ms,
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
    fusion_saving_ms: float = 0.0,
) -> tuple[float, float | None]:
    """The recipe's budgets in ms and bytes, checked against the cheapest child of the library (KL is not needed;
    with ``fusion_saving_ms``, the fastest child after FFN Fusion).

    Returns:
        ``(latency_max_ms, memory_max_bytes)``; the latency budget is the ratio times the parent's predicted
        latency, the memory budget None when unconstrained.

    Raises:
        RecipeError: a budget below the cheapest child; the message names the field and its smallest feasible value.
    """
    parent_ms = evaluate(options_LV, parent_choice, fixed_latency_ms=fixed_latency_ms).latency_ms
    latency_max_ms = latency_budget_ratio * parent_ms
    fastest_ms = fastest_latency_ms(
        options_LV, fixed_latency_ms=fixed_latency_ms, fusion_saving_ms=fusion_saving_ms
    )
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
    fusion_saving_ms: float = 0.0,
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
        fusion_saving_ms: latency saved per FFN merged by FFN Fusion (``nas.ffn_fusion.in_search``; 0 = off).

    Returns:
        1..num_solutions solutions, best (lowest KL) first.

    Raises:
        RecipeError: a budget no child of the library meets (see :func:`check_budgets`), or the two budgets
            together.
    """
    fixed = {
        "fixed_latency_ms": fixed_latency_ms,
        "fixed_memory_bytes": fixed_memory_bytes,
        "fusion_saving_ms": fusion_saving_ms,
    }
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
    fusion_saving_ms: float = 0.0,
) -> list[tuple[float, Solution]]:
    """Best solution at ``num_points`` latency budget ratios from the fastest feasible child to the parent.

    Returns:
        ``(ratio, solution)`` pairs in increasing ratio; budgets without a solution are skipped.
    """
    fixed = {
        "fixed_latency_ms": fixed_latency_ms,
        "fixed_memory_bytes": fixed_memory_bytes,
        "fusion_saving_ms": fusion_saving_ms,
    }
    parent_ms = evaluate(options_LV, parent_choice, **fixed).latency_ms
    fastest_ms = fastest_latency_ms(
        options_LV, fixed_latency_ms=fixed_latency_ms, fusion_saving_ms=fusion_saving_ms
    )
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
