"""Shared by the demo benchmarks: one `nemoforge run` in a fresh workdir, and its stages from `nemoforge status`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_fresh(recipe: str, workdir: Path, cache: Path, overrides: list[str], *, check: bool = True) -> float:
    """Run ``recipe`` in an emptied ``workdir`` (the parent conversion cache ``cache`` is kept); wall seconds.

    Raises:
        subprocess.CalledProcessError: the run failed and ``check`` is set.
    """
    shutil.rmtree(workdir, ignore_errors=True)
    env = {**os.environ, "NEMOFORGE_CACHE": str(cache.resolve()), "NEMOFORGE_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "nemoforge_cli", "run", recipe, "--workdir", str(workdir), "--quiet"]
    for item in overrides:
        cmd += ["--set", item]
    started = time.perf_counter()
    subprocess.run(cmd, check=check, env=env)
    return time.perf_counter() - started


def stage_rows(status: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``nemoforge status --json`` output, one per step: its ``stages`` (a bare list of rows is output
    from before the status had a head)."""
    return status if isinstance(status, list) else status["stages"]


def stage_status(workdir: Path) -> list[dict[str, Any]]:
    """``nemoforge status --json`` of the workdir's latest pipeline run: one dict per step (check-inputs, parent,
    corpus, then each stage)."""
    out = subprocess.run(
        [sys.executable, "-m", "nemoforge_cli", "status", "--workdir", str(workdir), "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    return stage_rows(json.loads(out))
