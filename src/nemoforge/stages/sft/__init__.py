"""sft: reasoning-toggle supervised fine-tuning (LN §3-4)."""

from nemoforge.stages.sft.stage import run

__all__ = ["run"]
