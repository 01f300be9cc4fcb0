"""95% confidence intervals for eval rates, means, before/after differences and child/parent ratios.

Every eval figure is an estimate from a finite sample; these functions give its interval so that two
figures are only called different when their intervals say so. The eval stage and the training stages
(distill, cpt, rl) use them, so this module sits outside both.

- :func:`wilson_interval`: a proportion of independent trials (Wilson 1927, "Probable inference, the law of
  succession, and statistical inference", JASA 22:209-212). Unlike the normal (Wald) interval it stays
  inside [0, 1] and has non-zero width at 0/n and n/n.
- :func:`clustered_wilson_interval`: a proportion whose trials come in clusters (k samples of one problem,
  the tokens of one held-out row, the instructions of one IFEval prompt): Wilson on the effective number
  of trials ``n / deff``, with the design effect ``deff`` from the clustered variance (Korn & Graubard 1998,
  "Confidence intervals for proportions with small expected number of positive counts estimated from survey
  data", Survey Methodology 24:193-201; the cluster-level standard error of Miller 2024, "Adding error bars
  to evals", arXiv 2411.00640, §2.2).
- :func:`clustered_mean_interval`: a per-token mean over clusters (held-out CE loss), normal interval on the
  clustered standard error (Miller 2024 §2.2).
- :func:`paired_mean_difference`: after - before on the same rows (a training stage's held-out gain), the
  clustered mean interval of the per-row differences (Miller 2024 §2.2 and §4, paired differences).
- :func:`paired_bootstrap_ratio`: child/parent on the same clusters (retention), percentile bootstrap over
  clusters (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", §13.3).
- :func:`paired_bootstrap_median_ratio`: child/parent tokens/s over round-robin timing rounds (speedup).

Shape legend: ``C`` clusters (problems, rows, prompts, timing rounds), ``N`` paired rows, ``R`` bootstrap
resamples.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

CONFIDENCE = 0.95
NUM_RESAMPLES = 2000


@dataclass(frozen=True)
class Tally:
    """One rate kept per cluster: successes and trials of each problem, prompt or held-out row.

    Attributes:
        successes_C: successes per cluster (e.g. correct samples of a problem, right tokens of a row).
        trials_C: trials per cluster (e.g. ``k`` samples, the row's predicted tokens).
    """

    successes_C: list[float]
    trials_C: list[float]

    @property
    def rate(self) -> float:
        """``sum(successes_C) / sum(trials_C)``: with ``k`` samples per problem, the mean pass@1 over problems."""
        return sum(self.successes_C) / sum(self.trials_C)


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, trials: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of ``successes / trials`` (Wilson 1927).

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``z`` the normal quantile of ``confidence``.
    Example: 8 of 10 at 95% gives (0.4902, 0.9433).

    Args:
        successes: successful trials (may be fractional when ``trials`` is an effective count).
        trials: number of trials, > 0.
        confidence: coverage, in (0, 1).

    Returns:
        ``(low, high)`` in [0, 1].

    Raises:
        ValueError: ``trials`` is not positive or ``successes`` is outside [0, trials].
    """
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval needs 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    z, n = _z(confidence), trials
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def clustered_wilson_interval(
    successes_C: Sequence[float], trials_C: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Wilson interval of ``sum(successes_C) / sum(trials_C)`` for trials grouped in clusters (Korn & Graubard 1998).

    The proportion is the ratio estimator ``p = S / N``; its clustered variance is
    ``Σ (s_c - p n_c)² / N²`` (the plug-in, divisor ``C``), and the effective number of trials is
    ``n_eff = p(1-p) / var``, capped at ``N`` (design effect at least 1). With one trial per cluster this is
    exactly :func:`wilson_interval`; with ``k`` samples of each problem it is the problem-level interval of
    mean pass@1. At ``p`` = 0 or 1 the variance is 0 and ``n_eff = N``, as for independent trials.

    Args:
        successes_C: successes per cluster.
        trials_C: trials per cluster (> 0 in total).
        confidence: coverage.

    Returns:
        ``(low, high)`` in [0, 1].

    Raises:
        ValueError: the two lists differ in length or hold no trial.
    """
    p, var, total = _ratio_estimate(successes_C, trials_C)
    n_eff = total if var == 0 else min(total, p * (1 - p) / var)
    return wilson_interval(p * n_eff, n_eff, confidence)


def clustered_mean_interval(
    sums_C: Sequence[float], counts_C: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Normal interval of the per-item mean ``sum(sums_C) / sum(counts_C)`` on its clustered standard error.

    ``mean ± z · sqrt(Σ (x_c - mean n_c)² / N²)`` (plug-in ratio-estimator variance, Miller 2024 §2.2): for a
    per-token loss summed per held-out row, tokens of one row are not independent, rows are.

    Raises:
        ValueError: the two lists differ in length or hold no item.
    """
    mean, var, _ = _ratio_estimate(sums_C, counts_C)
    half = _z(confidence) * math.sqrt(var)
    return mean - half, mean + half


class Estimate(NamedTuple):
    """A point estimate and its interval, in the unit of the values it came from."""

    point: float
    low: float
    high: float


def paired_mean_difference(
    before_N: Sequence[float],
    after_N: Sequence[float],
    clusters_N: Sequence[Hashable] | None = None,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """Mean of ``after_N - before_N`` over paired rows, with a normal interval on its clustered standard error.

    Both values of row ``i`` were measured on the same item (a held-out row before and after training), so the
    interval is that of the per-row differences ``d_i`` (Miller 2024, "Adding error bars to evals",
    arXiv 2411.00640, §4: pairing removes the items' own variance), here the clustered mean
    interval of :func:`clustered_mean_interval` over the clusters' sums of ``d`` (§2.2):
    ``mean(d) ± z · sqrt(Σ_c (Σ_{i∈c} d_i - mean(d) n_c)² / N²)``. Rows that share a cluster (one question
    asked in two reasoning modes) are not independent; with ``clusters_N`` None each row is its own cluster.
    Example: ``before_N = [0, 0]``, ``after_N = [0, 2]`` gives ``(1.0, -0.386, 2.386)``.

    Args:
        before_N: the value per row before (e.g. mean token KL in nats/token, a 0/1 accuracy).
        after_N: the value per row after, same rows in the same order, same unit.
        clusters_N: the cluster label per row (any hashable, e.g. the question), or None.
        confidence: coverage.

    Returns:
        ``Estimate(point, low, high)`` of ``mean(after - before)`` in the values' unit; a constant difference
        gives a zero-width interval.

    Raises:
        ValueError: the lists are empty or differ in length.
    """
    before, after = np.asarray(before_N, dtype=float), np.asarray(after_N, dtype=float)
    labels = range(before.size) if clusters_N is None else clusters_N
    if before.shape != after.shape or before.ndim != 1 or before.size == 0 or len(labels) != before.size:
        raise ValueError(
            f"paired_mean_difference needs equal, non-empty lists (and one cluster per row), got "
            f"{before.shape}, {after.shape}, {len(labels)} clusters"
        )
    index: dict[Hashable, int] = {}
    cluster_N = np.array([index.setdefault(label, len(index)) for label in labels])
    diff_N = after - before
    low, high = clustered_mean_interval(np.bincount(cluster_N, weights=diff_N), np.bincount(cluster_N), confidence)
    return Estimate(float(diff_N.mean()), low, high)


def _ratio_estimate(sums_C: Sequence[float], counts_C: Sequence[float]) -> tuple[float, float, float]:
    """``(Σx / Σn, Σ (x_c - mean n_c)² / (Σn)², Σn)``: the ratio estimator, its plug-in clustered variance, the count."""
    x, n = np.asarray(sums_C, dtype=float), np.asarray(counts_C, dtype=float)
    if x.shape != n.shape or n.sum() <= 0:
        raise ValueError(f"clustered intervals need two equal-length lists with a positive count, got {x.shape}, {n.shape}")
    total = float(n.sum())
    mean = float(x.sum()) / total
    return mean, float(((x - mean * n) ** 2).sum()) / total**2, total


def ratio(child: float, parent: float) -> float:
    """``child / parent``; at ``parent == 0``: 1.0 when ``child == 0`` too (nothing to lose), else ``inf``."""
    if parent == 0:
        return 1.0 if child == 0 else math.inf
    return child / parent


def _percentile_interval(ratios_R: np.ndarray, confidence: float) -> tuple[float, float]:
    # no interpolation: a resample's ratio may be inf (zero parent), and inf - inf is nan
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios_R, [tail, 1 - tail], method="inverted_cdf")
    return float(low), float(high)


def _paired_resamples(
    caller: str, child_C: Sequence[float], parent_C: Sequence[float], num_resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(child_RC, parent_RC)``: ``R`` resamples of ``C`` clusters drawn with replacement, pairs kept together.

    Raises:
        ValueError: the lists are empty or differ in length (the message names ``caller``).
    """
    c, p = np.asarray(child_C, dtype=float), np.asarray(parent_C, dtype=float)
    if c.shape != p.shape or c.size == 0:
        raise ValueError(f"{caller} needs two equal, non-empty lists, got {c.shape}, {p.shape}")
    idx_RC = np.random.default_rng(seed).integers(0, c.size, size=(num_resamples, c.size))
    return c[idx_RC], p[idx_RC]


def paired_bootstrap_ratio(
    child_C: Sequence[float],
    parent_C: Sequence[float],
    *,
    num_resamples: int = NUM_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``sum(child_C) / sum(parent_C)`` over paired clusters (Efron & Tibshirani §13.3).

    Child and parent were measured on the same clusters (problems, held-out rows, prompts) with the same
    trials per cluster, so the ratio of their rates is the ratio of their success sums. Each resample draws
    ``C`` cluster indices with replacement (seeded, numpy PCG64) and keeps child and parent of a cluster
    together; a resample whose parent sum is 0 gives :func:`ratio`'s value (inf, or 1 when the child's is 0).

    Args:
        child_C: the child's successes (or per-cluster means) per cluster.
        parent_C: the parent's, same clusters in the same order.
        num_resamples: bootstrap resamples ``R``.
        seed: generator seed.
        confidence: coverage.

    Returns:
        ``(low, high)``; ``high`` may be ``inf`` when the parent's successes sit in few clusters.

    Raises:
        ValueError: the lists are empty or differ in length.
    """
    child_RC, parent_RC = _paired_resamples("paired_bootstrap_ratio", child_C, parent_C, num_resamples, seed)
    child_R, parent_R = child_RC.sum(axis=1), parent_RC.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios_R = np.where(parent_R > 0, child_R / parent_R, np.where(child_R > 0, np.inf, 1.0))
    return _percentile_interval(ratios_R, confidence)


def paired_bootstrap_median_ratio(
    child_C: Sequence[float],
    parent_C: Sequence[float],
    *,
    num_resamples: int = NUM_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``median(child_C) / median(parent_C)`` over paired rounds.

    For decode speedup: ``child_C[i]`` and ``parent_C[i]`` are tokens/s timed back to back in round ``i``
    of a round-robin, so a resample draws rounds (keeping each pair) and takes the ratio of the medians.
    With few rounds (5) the interval is coarse but honest: it spans the rounds' own spread.

    Raises:
        ValueError: the lists are empty, differ in length, or a parent value is not positive.
    """
    if any(v <= 0 for v in parent_C):
        raise ValueError(f"paired_bootstrap_median_ratio needs positive parent values, got {list(parent_C)}")
    child_RC, parent_RC = _paired_resamples("paired_bootstrap_median_ratio", child_C, parent_C, num_resamples, seed)
    ratios_R = np.median(child_RC, axis=1) / np.median(parent_RC, axis=1)
    return _percentile_interval(ratios_R, confidence)
