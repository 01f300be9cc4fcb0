"""Where and how loops run: the compute device, the recipe's dtype, and whether progress bars show."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nemoforge.config import Recipe


def no_progress() -> bool:
    """True when progress bars are switched off (``NEMOFORGE_NO_PROGRESS=1``: tests, CI logs)."""
    return os.environ.get("NEMOFORGE_NO_PROGRESS") == "1"


def compute_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def recipe_dtype(recipe: Recipe) -> torch.dtype:
    """``recipe.dtype`` (``float32`` or ``bfloat16``) as a torch dtype: inference, teacher and export dtype."""
    return getattr(torch, recipe.dtype)
