"""Progress bars for long loops (tqdm), off when ``NEMOFORGE_NO_PROGRESS=1`` (tests, CI logs)."""

from __future__ import annotations

import os


def no_progress() -> bool:
    """True when progress bars are switched off (``NEMOFORGE_NO_PROGRESS=1``)."""
    return os.environ.get("NEMOFORGE_NO_PROGRESS") == "1"
