"""eval: child vs parent evaluation (LN §7.1) and the promotion-gate decision."""

from nemoforge.stages.eval.stage import run

__all__ = ["run"]
