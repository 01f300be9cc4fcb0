"""cpt: continued pretraining of the distilled child on the corpus (LN §2.2)."""

from nemoforge.stages.cpt.stage import run

__all__ = ["run"]
