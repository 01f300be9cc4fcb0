"""The recipe DAG as a KFP v2 pipeline (``parent -> corpus -> nas -> distill -> cpt``)."""

from nemoforge_pipelines.recipe_pipeline import build_pipeline, compile_recipe, unpinned_images

__all__ = ["build_pipeline", "compile_recipe", "unpinned_images"]
