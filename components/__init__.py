"""Thin KFP components: parse the recipe, call the library's runner, fill the outputs.

Each function is a lightweight Python component body (its source is embedded in the pipeline IR), so
its imports live inside it and it needs only nemoforge installed in the base image. ``make_components``
binds them to the recipe's base image.
"""

from nemoforge_components.stages import COMPONENT_FUNCS, make_components

__all__ = ["COMPONENT_FUNCS", "make_components"]
