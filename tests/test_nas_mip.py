"""The Puzzle MIP on a literal 3-layer block library: optimum, budgets, diversity, infeasibility, Pareto sweep;
and the fusion-aware search (``nas.ffn_fusion.in_search``) on a literal 4-layer library."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from nemoforge.errors import RecipeError
from nemoforge.stages.nas.mip import (
    GIB,
    Option,
    check_budgets,
    diverse_solutions,
    evaluate,
    fastest_latency_ms,
    ffn_merges,
    pareto_front,
    search,
)

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


def run_search(ratio, memory_gib=None, num_solutions=1, d=1, library=LIBRARY, saving_ms=0.0):
    return search(
        library,
        parent_choice=(0,) * len(library),
        fixed_latency_ms=FIXED_MS,
        fixed_memory_bytes=0.0,
        latency_budget_ratio=ratio,
        memory_budget_gib=memory_gib,
        num_solutions=num_solutions,
        min_diversity_layers=d,
        time_limit_s=10.0,
        fusion_saving_ms=saving_ms,
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


# ------------------------------------------------------------------------------------------ fusion in search
# Per layer: P parent (attention + FFN, 10 ms), F attention-free (6 ms: its FFN), A FFN-free (4 ms: its attention),
# E empty (attention and FFN removed, 0.5 ms). Layer 0 keeps its attention. Each FFN merged into an earlier FFN of its
# attention-free run saves 2 ms (the cost model's intercept). Parent: 2 + 4 x 10 = 42 ms.
P, F, A, E = (Option(0.0, 10.0), Option(0.1, 6.0, attention_no_op=True), Option(0.5, 4.0, ffn_no_op=True),
              Option(0.8, 0.5, attention_no_op=True, ffn_no_op=True))  # fmt: skip
FUSION_LIBRARY = [[P, A], [P, F, A, E], [P, F, A, E], [P, F, A, E]]
SAVING_MS = 2.0


def fusion_search(ratio: float, saving_ms: float):
    return run_search(ratio, library=FUSION_LIBRARY, saving_ms=saving_ms)


def test_ffn_merges_count_k_minus_one_per_attention_free_run() -> None:
    assert ffn_merges([P, F, F, F]) == 2
    assert ffn_merges([P, F, E, F]) == 1  # an empty layer inside a run belongs to it
    assert ffn_merges([P, F, A, F]) == 0  # attention between: two runs of one FFN
    assert ffn_merges([P, E, F, E]) == 0
    assert evaluate(FUSION_LIBRARY, (0, 1, 1, 1), fixed_latency_ms=2.0, fusion_saving_ms=2.0).latency_ms == 26.0


def test_fusion_aware_search_picks_a_child_the_plain_search_cannot() -> None:
    # Budget 28 ms = 2 fixed + 26 in the layers. Blind to fusion, P F F F costs 2 + 10 + 18 = 30 > 28: the best is
    # two F and one A (KL 0.7). Counting fusion, P F F F costs 30 - 2 merges x 2 ms = 26: KL 0.3.
    ratio = 28.0 / 42.0
    (plain,) = fusion_search(ratio, 0.0)
    (fused,) = fusion_search(ratio, SAVING_MS)
    assert plain.kl_div == pytest.approx(0.7) and plain.latency_ms <= 28.0
    assert fused.choice == (0, 1, 1, 1) and fused.kl_div == pytest.approx(0.3)
    assert fused.num_ffn_merges == 2 and fused.latency_ms == pytest.approx(26.0)
    assert evaluate(FUSION_LIBRARY, fused.choice, fixed_latency_ms=FIXED_MS).latency_ms == 30.0  # unfused: over


@pytest.mark.parametrize("saving_ms", [SAVING_MS, -1.0])  # a negative intercept: fusion costs time
def test_fusion_aware_search_matches_enumeration(saving_ms: float) -> None:
    """The c/z rows pin the merges exactly (both signs of the saving): the MIP's optimum, its latency and the
    fastest child (the dynamic program) equal what enumerating all 2 x 4^3 choices gives."""
    choices = list(itertools.product(*(range(len(row)) for row in FUSION_LIBRARY)))
    every = [evaluate(FUSION_LIBRARY, c, fixed_latency_ms=FIXED_MS, fusion_saving_ms=saving_ms) for c in choices]
    fastest = fastest_latency_ms(FUSION_LIBRARY, fixed_latency_ms=FIXED_MS, fusion_saving_ms=saving_ms)
    assert fastest == pytest.approx(min(s.latency_ms for s in every))
    for budget_ms in (fastest, 20.0, 24.0, 28.0, 31.0, 36.0, 42.0):
        (best,) = fusion_search(budget_ms / 42.0, saving_ms)
        feasible = [s for s in every if s.latency_ms <= budget_ms + 1e-9]
        assert best.kl_div == pytest.approx(min(s.kl_div for s in feasible)), budget_ms
        assert best.latency_ms <= budget_ms + 1e-9
        assert best == dataclasses.replace(
            evaluate(FUSION_LIBRARY, best.choice, fixed_latency_ms=FIXED_MS, fusion_saving_ms=saving_ms),
            solve_time_s=best.solve_time_s,
        )


def test_fusion_aware_budget_check_and_pareto_front() -> None:
    # Without empty layers: blind to fusion the fastest child is A A A A, 2 + 4 x 4 = 18 ms (ratio 0.4286); counting
    # a 5 ms saving it is A F F F, 2 + 4 + 6 + 1 + 1 = 14 ms. The budget check accepts what fusion reaches.
    library = [[P, A], [P, F, A], [P, F, A], [P, F, A]]
    fastest = fastest_latency_ms(library, fixed_latency_ms=FIXED_MS, fusion_saving_ms=5.0)
    assert fastest == pytest.approx(14.0)
    kwargs = {"parent_choice": (0, 0, 0, 0), "fixed_latency_ms": FIXED_MS, "fixed_memory_bytes": 0.0}
    budget = {"latency_budget_ratio": 14.0 / 42.0, "memory_budget_gib": None}
    assert check_budgets(library, fusion_saving_ms=5.0, **budget, **kwargs)[0] == pytest.approx(14.0)
    with pytest.raises(RecipeError, match="smallest feasible ratio is 0.4286"):
        check_budgets(library, **budget, **kwargs)
    front = pareto_front(library, num_points=4, fusion_saving_ms=5.0, **kwargs)
    assert front[0][0] == pytest.approx(14.0 / 42.0) and front[0][1].choice == (1, 1, 1, 1)  # A F F F
    assert front[-1][1].choice == (0, 0, 0, 0)
