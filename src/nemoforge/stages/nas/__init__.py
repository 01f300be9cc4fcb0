"""The nas stage: Puzzle block library, BLD, replace-1-block scoring, cost, MIP (arXiv 2411.19146)."""

from nemoforge.stages.nas.run import run

__all__ = ["run"]
