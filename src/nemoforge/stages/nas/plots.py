"""The NAS Pareto plot: predicted latency vs summed replace-1-block KL (Puzzle §4.2, Fig. 6 style)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from nemoforge.stages.nas.mip import Solution


def plot_pareto(
    front: Sequence[tuple[float, Solution]],
    solutions: Sequence[Solution],
    *,
    parent_latency_ms: float,
    latency_budget_ms: float,
    path: Path,
    title: str = "Puzzle search: predicted latency vs replace-1-block KL",
) -> Path:
    """Write a PNG of the budget sweep (line), the recipe's N solutions (numbered), the parent and the budget.

    Args:
        front: ``(ratio, solution)`` from :func:`~nemoforge.stages.nas.mip.pareto_front`.
        solutions: the solutions of the recipe's budget, best first (solution 1 is the built child).
        parent_latency_ms: the parent's predicted request latency.
        latency_budget_ms: the recipe's budget (a vertical line).
        path: output PNG.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.plot(
        [s.latency_ms for _, s in front],
        [s.kl_div for _, s in front],
        "o-",
        color="tab:blue",
        ms=4,
        label="MIP optimum per budget (sweep)",
    )
    ax.scatter(
        [s.latency_ms for s in solutions],
        [s.kl_div for s in solutions],
        marker="*",
        s=140,
        color="tab:orange",
        zorder=3,
        label=f"{len(solutions)} diverse solutions at the budget",
    )
    for k, s in enumerate(solutions, start=1):  # labels stacked: diverse solutions often cost about the same
        label = f"{k}: KL {s.kl_div:.3g}"
        ax.annotate(
            label,
            (s.latency_ms, s.kl_div),
            textcoords="offset points",
            xytext=(8, 6 + 11 * (k - 1)),
            fontsize=8,
        )
    ax.scatter([parent_latency_ms], [0.0], marker="s", s=60, color="black", zorder=3, label="parent")
    ax.axvline(latency_budget_ms, color="tab:red", ls="--", lw=1, label="latency budget")
    ax.set_xlabel("predicted request latency (ms)")
    ax.set_ylabel("summed replace-1-block KL (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
