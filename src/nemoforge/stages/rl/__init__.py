"""rl: GRPO with verifiable rewards (LN §5), then an optional offline preference pass (LN §6)."""

from nemoforge.stages.rl.stage import run

__all__ = ["run"]
