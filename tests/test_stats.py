"""Intervals against known values: Wilson, clustered, paired differences, paired bootstrap ratios."""

from __future__ import annotations

import math

import pytest

from nemoforge.stats import (
    Tally,
    clustered_mean_interval,
    clustered_wilson_interval,
    paired_bootstrap_median_ratio,
    paired_bootstrap_ratio,
    paired_mean_difference,
    ratio,
    wilson_interval,
)


def test_wilson_interval_known_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # Wilson 1927; Newcombe 1998 table
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # non-zero width at 0/n
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    with pytest.raises(ValueError, match="successes <= trials"):
        wilson_interval(3, 2)


def test_clustered_wilson_interval_reduces_to_wilson_and_widens_for_correlated_samples():
    # one trial per cluster: exactly Wilson
    assert clustered_wilson_interval([1, 0, 1, 1, 0, 1, 1, 1, 1, 1], [1] * 10) == pytest.approx(wilson_interval(8, 10))
    # 4 problems x 2 samples, each problem all right or all wrong: 8 samples carry the information of 4 trials
    assert clustered_wilson_interval([2, 2, 0, 0], [2] * 4) == pytest.approx(wilson_interval(2, 4))
    # the same 4 of 8 right, spread one per problem (no between-problem variance): 8 independent trials
    assert clustered_wilson_interval([1, 1, 1, 1], [2] * 4) == pytest.approx(wilson_interval(4, 8))
    # at the floor there is no variance to estimate: Wilson on all trials
    assert clustered_wilson_interval([0, 0, 0], [4, 4, 4]) == pytest.approx(wilson_interval(0, 12))


def test_clustered_mean_interval_known_value():
    # mean 2; plug-in variance ((1-2)^2 + 0 + (3-2)^2) / 3^2 = 2/9; half width 1.959964 * sqrt(2/9) = 0.92394
    low, high = clustered_mean_interval([1.0, 2.0, 3.0], [1, 1, 1])
    assert (low, high) == pytest.approx((2 - 0.92394, 2 + 0.92394), abs=1e-5)
    # per-row sums over unequal token counts: the mean is per token, 10 / 5
    assert sum(clustered_mean_interval([4.0, 6.0], [2, 3])) / 2 == pytest.approx(2.0)


def test_ratio_at_a_zero_parent():
    assert ratio(0.3, 0.6) == 0.5
    assert ratio(0.0, 0.0) == 1.0  # nothing to lose
    assert ratio(0.2, 0.0) == math.inf


def test_paired_bootstrap_ratio():
    # a constant per-cluster ratio: every resample gives exactly 2
    assert paired_bootstrap_ratio([2, 4, 6, 8], [1, 2, 3, 4]) == (2.0, 2.0)
    # seeded: the same call gives the same interval; another seed may not
    child, parent = [1, 0, 2, 1, 0, 2, 1, 1], [1, 1, 2, 0, 1, 2, 1, 0]
    first = paired_bootstrap_ratio(child, parent, seed=3)
    assert first == paired_bootstrap_ratio(child, parent, seed=3)
    low, high = first
    assert low < ratio(sum(child), sum(parent)) < high
    # the parent's only success in one cluster of 10: about a third of resamples miss it, the ratio is unbounded
    assert paired_bootstrap_ratio([1] * 10, [1] + [0] * 9)[1] == math.inf
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_bootstrap_ratio([1, 2], [1])


def test_paired_bootstrap_median_ratio():
    parent = [10.0, 12.0, 9.0, 11.0, 10.5]
    assert paired_bootstrap_median_ratio([1.5 * p for p in parent], parent) == pytest.approx((1.5, 1.5))
    low, high = paired_bootstrap_median_ratio([15.0, 30.0, 14.0, 16.0, 15.5], parent)
    assert low <= 15.5 / 10.5 <= high and high > low


def test_tally_rate_is_mean_pass_at_1():
    # 3 problems x 4 samples: 2/4, 4/4, 0/4 correct -> (0.5 + 1 + 0) / 3
    assert Tally([2, 4, 0], [4, 4, 4]).rate == pytest.approx(0.5)
    assert Tally([1, 0], [1, 1]).rate == 0.5



def test_paired_mean_difference_known_values():
    # a constant shift: exactly that shift, with no width (every row moved alike)
    shift = paired_mean_difference([0.5, 1.0, 2.0, 0.1], [0.25, 0.75, 1.75, -0.15])
    assert shift == pytest.approx((-0.25, -0.25, -0.25))
    # differences 0 and 2: mean 1; plug-in variance ((0-1)^2 + (2-1)^2) / 2^2 = 1/2; half width 1.959964 * 0.70711
    point, low, high = paired_mean_difference([0.0, 0.0], [0.0, 2.0])
    assert (point, low, high) == pytest.approx((1.0, 1 - 1.38590, 1 + 1.38590), abs=1e-5)
    assert (point, low, high) == (1.0, *clustered_mean_interval([0.0, 2.0], [1, 1]))
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_mean_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="one cluster per row"):
        paired_mean_difference([1.0, 2.0], [1.0, 2.0], clusters_N=["a"])


def test_paired_mean_difference_widens_for_correlated_clusters():
    # 4 questions x 2 rows, both rows of a question moved alike: 8 differences carry the information of 4
    before = [0.0] * 8
    after = [1.0, 1.0, -1.0, -1.0, 2.0, 2.0, 0.0, 0.0]
    questions = ["q1", "q1", "q2", "q2", "q3", "q3", "q4", "q4"]
    rows = paired_mean_difference(before, after)
    clustered = paired_mean_difference(before, after, clusters_N=questions)
    assert clustered.point == rows.point == pytest.approx(0.5)
    # the clustered variance is twice the row-level one (2 rows per question, within-question correlation 1)
    assert clustered.high - clustered.low == pytest.approx(math.sqrt(2) * (rows.high - rows.low))
    # labels need not be adjacent: the same clusters in another row order give the same interval
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    shuffled = paired_mean_difference(before, [after[i] for i in order], clusters_N=[questions[i] for i in order])
    assert shuffled == pytest.approx(clustered)
