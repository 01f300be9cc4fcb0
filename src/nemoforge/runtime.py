"""Where and how long loops run: the compute device, and whether progress bars show."""

from __future__ import annotations

import os

import torch


def no_progress() -> bool:
    """True when progress bars are switched off (``NEMOFORGE_NO_PROGRESS=1``: tests, CI logs)."""
    return os.environ.get("NEMOFORGE_NO_PROGRESS") == "1"


def compute_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
