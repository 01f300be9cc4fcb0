"""The local cache directory: the parent's download and conversion, corpora, S3 downloads."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The local cache: the parent's download and conversion, corpora, S3 downloads (``s3/``).

    ``$NEMOFORGE_CACHE`` when set (and not empty), else ``~/.cache/nemoforge``.
    """
    return Path(os.environ.get("NEMOFORGE_CACHE") or Path.home() / ".cache" / "nemoforge")
