"""Where and how loops run: the compute device, the recipe's dtype, whether progress bars show, and the seeds."""

from __future__ import annotations

import hashlib
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


def seed_for(recipe: Recipe, stream: str) -> int:
    """The seed of one named random stream of a run, derived from the recipe's one ``seed``.

    Every use of randomness in a step draws from its own stream, named ``<step>.<purpose>`` (``sft.split``,
    ``rl.prompts``, ``eval.bootstrap``, ...; docs/internals.md lists them): two uses never share numbers by
    accident, as sft's data and rl's prompt pool once did at ``seed`` and ``seed + 1`` of the same generator, and
    a stream added or removed leaves every other one as it was. The same recipe seed and name always give the
    same stream, on any machine.

    Args:
        recipe: the resolved recipe (its ``seed``).
        stream: the stream's name.

    Returns:
        The first 31 bits of sha256 of ``"<seed>/<stream>"``: a non-negative int below 2**31, which torch,
        :mod:`random`, numpy and vLLM all accept as a seed.
    """
    digest = hashlib.sha256(f"{recipe.seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF
