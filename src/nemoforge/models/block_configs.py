"""``block_configs`` arithmetic: the parent's blocks, FFN widths <-> ``ffn_mult``, parameter and KV-cache sizes.

The architecture of every model nemoforge handles is one ``block_configs`` list (one ``BlockConfig`` per layer);
see ``nemoforge.models.hf.configuration_decilm`` for the schema and ../shared/reference/recipe.md §3.2-3.4.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence

from transformers import LlamaConfig

from nemoforge.models.hf.configuration_decilm import (
    AttentionConfig,
    BlockConfig,
    DeciLMConfig,
    FFNConfig,
    ffn_mult_to_intermediate_size,
)


def ffn_mult_for(intermediate_size: int, hidden_size: int) -> float:
    """``ffn_mult`` that encodes an FFN width: ``round(1.5 * I / H, 6)``, checked to round-trip exactly.

    Hidden 576: 1536 -> 4.0, 1024 -> 2.666667; hidden 4096: 14336 -> 5.25 (recipe.md §3.3).

    Raises:
        ValueError: the width does not round-trip through ``ffn_mult_to_intermediate_size`` (use a multiple of 256).
    """
    ffn_mult = round(1.5 * intermediate_size / hidden_size, 6)
    if ffn_mult_to_intermediate_size(ffn_mult, hidden_size) != intermediate_size:
        raise ValueError(
            f"FFN width {intermediate_size} is not expressible as ffn_mult for hidden size {hidden_size} "
            f"(ffn_mult {ffn_mult} gives {ffn_mult_to_intermediate_size(ffn_mult, hidden_size)}); "
            "use a multiple of 256"
        )
    return ffn_mult


def intermediate_size(ffn: FFNConfig, hidden_size: int) -> int:
    """FFN width of a block in channels (0 for ``no_op``): from ``ffn_mult`` when present, else ``intermediate_size``."""
    return ffn.width(hidden_size)


def ffn_config(width: int, hidden_size: int) -> FFNConfig:
    """A kept FFN of ``width`` channels as stock vLLM reads it: ``ffn_mult`` when one reaches the width exactly
    (``ffn_mult_for``), else ``intermediate_size`` alone (no ``ffn_mult`` attribute; recipe.md §3.4)."""
    try:
        return FFNConfig(ffn_mult=ffn_mult_for(width, hidden_size))
    except ValueError:
        return FFNConfig(intermediate_size=width)


def block_config(
    n_heads_in_group: int | None, ffn_intermediate_size: int | None, hidden_size: int
) -> BlockConfig:
    """One block from widths: ``n_heads_in_group`` None = no-op attention, ``ffn_intermediate_size`` None = no-op FFN.

    Raises:
        ValueError: the FFN width does not round-trip (see ``ffn_mult_for``).
    """
    attention = (
        AttentionConfig(no_op=True)
        if n_heads_in_group is None
        else AttentionConfig(n_heads_in_group=n_heads_in_group)
    )
    if ffn_intermediate_size is None:
        ffn = FFNConfig(no_op=True)
    else:
        ffn = FFNConfig(ffn_mult=ffn_mult_for(ffn_intermediate_size, hidden_size))
    return BlockConfig(attention=attention, ffn=ffn)


def parent_block_configs(config: LlamaConfig) -> list[BlockConfig]:
    """All-parent ``block_configs`` of a Llama: every layer keeps its GQA attention and its FFN width.

    Raises:
        ValueError: the parent's FFN width is not expressible as ``ffn_mult`` (not a multiple of 256), or its
            KV heads do not divide its query heads.
    """
    num_kv_heads = config.num_key_value_heads or config.num_attention_heads
    if config.num_attention_heads % num_kv_heads:
        raise ValueError(
            f"{num_kv_heads} KV heads do not divide {config.num_attention_heads} attention heads"
        )
    block = block_config(
        config.num_attention_heads // num_kv_heads, config.intermediate_size, config.hidden_size
    )
    return [copy.deepcopy(block) for _ in range(config.num_hidden_layers)]


def count_params(config: DeciLMConfig) -> int:
    """Parameters of a ``DeciLMForCausalLM`` with this config (a tied LM head counted once)."""
    D, H, Dh, V = config.hidden_size, config.num_attention_heads, config.head_dim, config.vocab_size
    total = V * D + D  # embed_tokens + final norm
    if not config.tie_word_embeddings:
        total += V * D
    for layer_idx in range(config.num_hidden_layers):
        K = config.num_key_value_heads_of(layer_idx)
        if K:
            total += D + 2 * D * H * Dh + 2 * D * K * Dh  # input_layernorm, q/o, k/v
            if config.attention_bias:
                total += H * Dh + 2 * K * Dh + D
        I = config.intermediate_size_of(layer_idx)
        if I:
            total += D + 3 * D * I  # post_attention_layernorm, gate/up/down
            if config.mlp_bias:
                total += 2 * I + D
    return total


def parent_layers(config: DeciLMConfig) -> list[list[int]]:
    """Per layer, the parent layers whose computation it carries, in the parent's numbering.

    A Puzzle child keeps the parent's layer count, one layer each: ``[[0], [1], ...]``. FFN Fusion
    (``stages/nas/fusion.py``) replaces a run of layers by one block and records the map in the config as
    ``parent_layers`` (a plain top-level key of config.json; transformers and vLLM keep it as an attribute and
    ignore it), e.g. ``[[0], [1, 2, 3], [4]]``. The output of layer ``j`` then stands for the output of parent
    layer ``parent_layers[j][-1]``: what distillation pairs hidden states by.

    Raises:
        ValueError: the recorded map does not cover layers ``0 .. n - 1`` in order, one entry per layer.
    """
    recorded = getattr(config, "parent_layers", None)
    if recorded is None:
        return [[i] for i in range(config.num_hidden_layers)]
    flat = [j for layers in recorded for j in layers]
    if len(recorded) != config.num_hidden_layers or not all(recorded) or flat != list(range(len(flat))):
        raise ValueError(
            f"config parent_layers={recorded} must give each of the {config.num_hidden_layers} layers a non-empty "
            "run of parent layers, the runs in order and covering 0 .. n - 1"
        )
    return [list(layers) for layers in recorded]


def kv_cache_bytes_per_token(config: DeciLMConfig, kv_bytes: int = 2) -> int:
    """KV-cache bytes one token costs across all layers: ``sum over attention layers of 2 * K * Dh * kv_bytes``.

    Args:
        kv_bytes: bytes per cached element (2 for bf16/fp16, 1 for fp8, 4 for fp32).
    """
    num_kv_heads = sum(config.num_key_value_heads_of(i) for i in range(config.num_hidden_layers))
    return 2 * num_kv_heads * config.head_dim * kv_bytes


def summarize(block_configs: Sequence[BlockConfig], hidden_size: int | None = None) -> str:
    """One line: kept attention layers and FFN widths, e.g. ``"attn 24/30, ffn {1536: 20, 1024: 6, no_op: 4}"``.

    Args:
        hidden_size: when given, FFN widths are channels; otherwise they are ``ffn_mult`` values (``x4.0``).
    """
    num_attention = sum(not b.attention.no_op for b in block_configs)

    def label(ffn: FFNConfig) -> str | None:
        if ffn.no_op:
            return None
        if hidden_size:
            return str(intermediate_size(ffn, hidden_size))
        # a block given by intermediate_size alone has no ffn_mult: shown in channels
        return f"x{ffn.ffn_mult}" if hasattr(ffn, "ffn_mult") else str(ffn.intermediate_size)

    widths = Counter(label(b.ffn) for b in block_configs)
    parts = [
        f"{w}: {widths[w]}"
        for w in sorted((w for w in widths if w), key=lambda w: float(w.lstrip("x")), reverse=True)
    ]
    if widths[None]:
        parts.append(f"no_op: {widths[None]}")
    return f"attn {num_attention}/{len(block_configs)}, ffn {{{', '.join(parts)}}}"
