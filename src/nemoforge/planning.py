"""Plan GPUs from model shapes before anything runs: tensor-parallel sizes and the GPUs eval needs (issue 13 §4).

Pure functions of a parent's shape (:class:`~nemoforge.config.ParentArchitecture`, the fields of its
``config.json``) and a few recipe numbers, so recipe validation, ``nemoforge show`` and the preflight
share them. Sizes are bytes unless a name says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nemoforge.config.inputs import ParentArchitecture
    from nemoforge.config.recipe import Recipe

GPU_MEMORY_BYTES = {
    "NVIDIA-H200": 143_771 * 2**20,  # nvidia-smi memory.total of an H200 SXM (141 GB on the data sheet)
    "NVIDIA-H100-80GB-HBM3": 81_559 * 2**20,  # nvidia-smi memory.total of an H100 SXM 80GB
}
"""Memory of one GPU by its ``nvidia.com/gpu.product`` node label (the infra/karpenter pools' labels)."""

GPU_MEMORY_UTILIZATION = 0.9
"""Fraction of a GPU's memory the model may fill: vLLM's default ``gpu_memory_utilization`` (the rest holds the
CUDA context, NCCL buffers and allocator slack)."""

LOGITS_BYTES = 4
"""Bytes per logit: eval scores held-out rows with fp32 logits (lm_loss, KL)."""

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def num_params(arch: ParentArchitecture) -> int:
    """Parameters of a Llama decoder: embedding (+ untied LM head) + per layer Q, K, V, O, gate/up/down and two
    RMSNorms + the final norm.

    Llama-3.3-70B (hidden 8192, 80 layers, 64/8 heads, FFN 28672, vocab 128256, untied): 70,553,706,496.
    """
    hidden, head_dim = arch.hidden_size, arch.head_dim or arch.hidden_size // arch.num_attention_heads
    embed = arch.vocab_size * hidden * (1 if arch.tie_word_embeddings else 2)
    attention = 2 * hidden * arch.num_attention_heads * head_dim + 2 * hidden * arch.num_key_value_heads * head_dim
    per_layer = attention + 3 * hidden * arch.intermediate_size + 2 * hidden
    return embed + arch.num_hidden_layers * per_layer + hidden


def tensor_parallel_sizes(arch: ParentArchitecture) -> list[int]:
    """Tensor-parallel sizes that split the model into whole heads: the common divisors of the attention and KV
    head counts (64 and 8 heads: 1, 2, 4, 8). vLLM shards Q heads and KV heads over the ranks the same way."""
    return [t for t in range(1, arch.num_key_value_heads + 1)
            if arch.num_attention_heads % t == 0 and arch.num_key_value_heads % t == 0]


def check_tensor_parallel(field: str, size: int, arch: ParentArchitecture, where: str) -> None:
    """Raise unless ``size`` splits the model's heads (:func:`tensor_parallel_sizes`).

    Args:
        field: the recipe field holding the size, named first in the message.
        where: where the head counts come from (``model.parent.architecture`` or the parent's config.json).

    Raises:
        ValueError: one line, e.g. ``resources.eval.gpu_count=3: eval's tensor-parallel size must divide ...``.
    """
    if size not in tensor_parallel_sizes(arch):
        raise ValueError(
            f"{field}={size}: a tensor-parallel size must divide the attention and KV head counts "
            f"({arch.num_attention_heads} and {arch.num_key_value_heads}, {where}); use one of "
            f"{', '.join(map(str, tensor_parallel_sizes(arch)))}"
        )


@dataclass(frozen=True)
class EvalPlan:
    """What eval needs on GPUs of ``gpu_memory_bytes`` (:func:`plan_eval`)."""

    num_params: int
    weight_bytes: int
    kv_cache_bytes: int
    logits_bytes: int
    gpu_memory_bytes: int
    num_gpus: int  # the smallest tensor-parallel size that fits; 0 when none does

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.logits_bytes

    def breakdown(self) -> str:
        """``70.55B params = 141.1 GB weights + 107.4 GB KV cache + 33.6 GB logits = 282.1 GB over 90% of ...``."""
        gb = 1e9
        return (
            f"{self.num_params / 1e9:.2f}B params = {self.weight_bytes / gb:.1f} GB weights + "
            f"{self.kv_cache_bytes / gb:.1f} GB KV cache + {self.logits_bytes / gb:.1f} GB logits = "
            f"{self.total_bytes / gb:.1f} GB over {GPU_MEMORY_UTILIZATION:.0%} of {self.gpu_memory_bytes / gb:.1f} GB "
            "per GPU"
        )

    def describe(self) -> str:
        """One line: ``4 GPUs: 70.55B params = ...`` (:meth:`breakdown`)."""
        return f"{self.num_gpus} GPU{'s' * (self.num_gpus != 1)}: {self.breakdown()}"


def plan_eval(recipe: Recipe, arch: ParentArchitecture, gpu_memory_bytes: int) -> EvalPlan:
    """The GPUs eval needs: the smallest tensor-parallel size ``t`` (:func:`tensor_parallel_sizes`) with

        (W + KV + A) / t <= GPU_MEMORY_UTILIZATION x gpu_memory_bytes

    - ``W = max(P_parent, P_child) x b``: eval loads parent and child one after the other (issue 13 §4), so the
      larger one counts; a Puzzle child keeps or drops the parent's sub-blocks (Puzzle §3, arXiv 2411.19146), so
      ``P_child <= P_parent`` and ``W = P_parent x b`` (:func:`num_params`), ``b`` the bytes of ``recipe.dtype``.
    - ``KV = 2 x L x n_kv x d_head x b x B x (T_in + T_out)``: the K and V cache of a full eval batch, the standard
      size (PagedAttention, Kwon et al. 2023, §2 / arXiv 2309.06180), ``B = eval.batch_size``, prompts of at most
      ``T_in = data.seq_len_tokens`` (the held-out rows' length) and ``T_out = max(eval.max_new_tokens,
      eval.ifeval_max_new_tokens)`` generated tokens.
    - ``A = B x T_in x V x 4``: the activation headroom, the largest activation of an eval forward pass, the fp32
      logits of one batch of held-out rows (lm_loss and KL read them whole).

    Tensor parallelism splits all three (weights and KV cache by heads, logits by vocabulary), hence the ``/ t``.
    Llama-3.3-70B in bf16 at eval batch 8, 8,192 + 32,768 tokens: W = 141.1 GB, KV = 107.4 GB, A = 33.6 GB,
    282.1 GB over 0.9 x 150.8 GB (H200) = 2.08 GPUs, rounded up to a divisor of 64 and 8 heads: 4 GPUs.

    Returns:
        the plan; ``num_gpus`` is 0 when even the largest tensor-parallel size does not fit.
    """
    dtype_bytes = DTYPE_BYTES[recipe.dtype]
    params = num_params(arch)
    head_dim = arch.head_dim or arch.hidden_size // arch.num_attention_heads
    batch, prompt_tokens = recipe.eval.batch_size, recipe.data.seq_len_tokens
    new_tokens = max(recipe.eval.max_new_tokens, recipe.eval.ifeval_max_new_tokens)
    kv_per_token = 2 * arch.num_hidden_layers * arch.num_key_value_heads * head_dim * dtype_bytes
    kv_cache = kv_per_token * batch * (prompt_tokens + new_tokens)
    logits = batch * prompt_tokens * arch.vocab_size * LOGITS_BYTES
    total, usable = params * dtype_bytes + kv_cache + logits, GPU_MEMORY_UTILIZATION * gpu_memory_bytes
    fits = [t for t in tensor_parallel_sizes(arch) if total / t <= usable]
    return EvalPlan(params, params * dtype_bytes, kv_cache, logits, gpu_memory_bytes, fits[0] if fits else 0)
