"""distill: global knowledge distillation of the child from the parent (Puzzle §4.3, LN §2.2)."""

from nemoforge.stages.distill.stage import run

__all__ = ["run"]
