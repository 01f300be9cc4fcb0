"""The Puzzle MIP on a literal 3-layer block library: optimum, budgets, diversity, infeasibility, Pareto sweep."""

from __future__ import annotations

import itertools

import pytest

from nemoforge.errors import RecipeError
from nemoforge.stages.nas.mip import GIB, Option, diverse_solutions, evaluate, pareto_front, search

# Per layer: parent (kl 0, 10 ms), variant a (saves 4 ms), variant b (saves 8 ms); KLs differ per layer.
# Memory in GiB units: parent 3, a 2, b 1.
KL = [(0.0, 0.30, 0.90), (0.0, 0.05, 0.40), (0.0, 0.20, 0.25)]
LIBRARY = [
    [Option(kl, ms, mem * GIB) for kl, ms, mem in zip(row, (10.0, 6.0, 2.0), (3, 2, 1), strict=True)]
    for row in KL
]
PARENT = (0, 0, 0)
FIXED_MS = 2.0  # embedding + LM head: the parent takes 32 ms


def brute_force(latency_max_ms, memory_max_bytes=None, exclude=(), d=1):
    """Minimum-KL choice by enumeration (the reference the MIP must match)."""
    best = None
    for choice in itertools.product(range(3), repeat=3):
        s = evaluate(LIBRARY, choice, fixed_latency_ms=FIXED_MS)
        if s.latency_ms > latency_max_ms or (memory_max_bytes and s.memory_bytes > memory_max_bytes):
            continue
        if any(sum(a != b for a, b in zip(choice, prev, strict=True)) < d for prev in exclude):
            continue
        if best is None or s.kl_div < best.kl_div:
            best = s
    return best


def run_search(ratio, memory_gib=None, num_solutions=1, d=1):
    return search(
        LIBRARY,
        parent_choice=PARENT,
        fixed_latency_ms=FIXED_MS,
        fixed_memory_bytes=0.0,
        latency_budget_ratio=ratio,
        memory_budget_gib=memory_gib,
        num_solutions=num_solutions,
        min_diversity_layers=d,
        time_limit_s=10.0,
    )


def test_mip_picks_known_optimum_within_budget() -> None:
    # Budget 0.625 x 32 ms = 20 ms = 2 fixed + 18 in the layers: the best is (parent, a, b) with KL 0.05 + 0.25.
    (best,) = run_search(0.625)
    assert best.choice == (0, 1, 2)
    assert best.kl_div == pytest.approx(0.30)
    assert best.latency_ms == pytest.approx(20.0) and best.latency_ms <= 0.625 * 32.0
    assert best.choice == brute_force(20.0).choice


def test_mip_budget_at_parent_keeps_parent() -> None:
    (best,) = run_search(1.0)
    assert best.choice == PARENT and best.kl_div == 0.0


def test_mip_memory_budget_binds() -> None:
    # Latency alone allows (parent, a, b) = 3 + 2 + 1 = 6 GiB; a 5 GiB budget forces a cheaper (same-latency) mix.
    (best,) = run_search(0.625, memory_gib=5.0)
    reference = brute_force(20.0, memory_max_bytes=5 * GIB)
    assert best.memory_bytes <= 5 * GIB
    assert best.choice == reference.choice
    assert best.kl_div == pytest.approx(reference.kl_div) and best.kl_div > 0.30


def test_diverse_solutions_differ_in_enough_layers() -> None:
    solutions = run_search(0.625, num_solutions=3, d=2)
    assert len(solutions) == 3
    for a, b in itertools.combinations(solutions, 2):
        assert sum(x != y for x, y in zip(a.choice, b.choice, strict=True)) >= 2
    for s in solutions:
        assert s.latency_ms <= 20.0 + 1e-9
    # Each is the best choice among those far enough from the earlier ones.
    for k, s in enumerate(solutions):
        reference = brute_force(20.0, exclude=[p.choice for p in solutions[:k]], d=2)
        assert s.kl_div == pytest.approx(reference.kl_div)
    assert [s.kl_div for s in solutions] == sorted(s.kl_div for s in solutions)


def test_diverse_solutions_stop_when_exhausted() -> None:
    # Budget 0.25 x 32 = 8 ms: only (b, b, b) fits, so one solution comes back for three asked.
    found = diverse_solutions(
        LIBRARY, num_solutions=3, min_diversity_layers=1, latency_max_ms=8.0, fixed_latency_ms=FIXED_MS
    )
    assert [s.choice for s in found] == [(2, 2, 2)]


def test_infeasible_latency_budget_names_field_and_smallest_ratio() -> None:
    # The fastest child takes 2 + 3 x 2 = 8 ms of 32: the smallest feasible ratio is 0.25.
    with pytest.raises(
        RecipeError, match=r"nas\.latency_budget_ratio=0\.2 is infeasible.*smallest feasible ratio is 0\.25"
    ):
        run_search(0.2)
    assert run_search(0.25)[0].choice == (2, 2, 2)


def test_infeasible_memory_budget_names_field() -> None:
    with pytest.raises(RecipeError, match=r"nas\.memory_budget_gib=2\.0 is infeasible.*needs 3\.0000 GiB"):
        run_search(1.0, memory_gib=2.0)


def test_jointly_infeasible_budgets() -> None:
    # One layer: the fast variant is memory-heavy, the small one slow; each budget alone can be met, both cannot.
    library = [[Option(0.0, 10.0, 3 * GIB), Option(0.1, 2.0, 3 * GIB), Option(0.2, 10.0, 1 * GIB)]]
    with pytest.raises(
        RecipeError, match=r"no child meets nas\.latency_budget_ratio=0\.5 and nas\.memory_budget_gib=2\.0"
    ):
        search(
            library,
            parent_choice=(0,),
            fixed_latency_ms=0.0,
            fixed_memory_bytes=0.0,
            latency_budget_ratio=0.5,
            memory_budget_gib=2.0,
            num_solutions=1,
            min_diversity_layers=1,
            time_limit_s=10.0,
        )


def test_pareto_front_is_monotone_and_ends_at_parent() -> None:
    front = pareto_front(LIBRARY, parent_choice=PARENT, fixed_latency_ms=FIXED_MS, num_points=7)
    assert len(front) == 7
    ratios = [r for r, _ in front]
    assert ratios[0] == pytest.approx(0.25) and ratios[-1] == pytest.approx(1.0)
    kls = [s.kl_div for _, s in front]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(kls))
    assert front[-1][1].choice == PARENT
    for ratio, s in front:
        assert s.latency_ms <= ratio * 32.0 + 1e-6
        assert s.kl_div == pytest.approx(brute_force(ratio * 32.0 + 1e-9).kl_div)
