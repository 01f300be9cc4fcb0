"""Llama -> DeciLM conversion, loading any supported checkpoint as a ``DeciLMForCausalLM``, and child init.

A ``LlamaForCausalLM`` is the all-parent point of the Puzzle search space (arXiv 2411.19146 §3): same weights,
same names, ``block_configs`` with every layer kept. ``child_from_parent`` builds a child of other
``block_configs`` from a parent's weights (FFN channels sliced, KV heads mean-pooled within groups).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from nemoforge.errors import NemoforgeError
from nemoforge.models.block_configs import parent_block_configs
from nemoforge.models.hf.configuration_decilm import BlockConfig, DeciLMConfig
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM
from nemoforge.models.parent import check_hf_dir
from nemoforge.models.remote_code import verify_remote_code

# Top-level keys that are per layer in DeciLM, or describe the source class rather than the architecture.
_NOT_COPIED = {
    "block_configs",
    "intermediate_size",
    "num_key_value_heads",
    "architectures",
    "transformers_version",
}


def decilm_config_from_llama(
    llama_config, block_configs: Sequence[BlockConfig] | None = None
) -> DeciLMConfig:
    """A ``DeciLMConfig`` with the Llama's top-level keys and ``block_configs`` (default: all-parent)."""
    keys = {f.name for f in dataclasses.fields(DeciLMConfig)} - _NOT_COPIED
    kwargs = {k: copy.deepcopy(getattr(llama_config, k)) for k in keys if hasattr(llama_config, k)}
    blocks = (
        parent_block_configs(llama_config) if block_configs is None else copy.deepcopy(list(block_configs))
    )
    return DeciLMConfig(**kwargs, block_configs=blocks)


def llama_to_decilm(llama: LlamaForCausalLM) -> DeciLMForCausalLM:
    """The same network as an all-parent ``DeciLMForCausalLM`` (weights copied by name; logits equal to ~1e-6).

    Raises:
        ValueError: the Llama's FFN width is not expressible as ``ffn_mult`` (see ``parent_block_configs``).
    """
    config = decilm_config_from_llama(llama.config)
    dtype = llama.get_input_embeddings().weight.dtype
    model = DeciLMForCausalLM(config).to(dtype)
    model.load_state_dict(llama.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(llama.generation_config)
    return model.eval()


def load_causal_lm(path: Path | str, dtype: torch.dtype = torch.float32) -> DeciLMForCausalLM:
    """Load a checkpoint directory as a ``DeciLMForCausalLM`` in ``dtype`` (eval mode).

    A ``llama`` checkpoint is converted (all-parent); a ``nemotron-nas`` one (a nemoforge export) is loaded directly.
    Our own classes load it, not its Python files; those are still verified
    (:func:`~nemoforge.models.remote_code.verify_remote_code`), so a tampered export is refused at its first load
    rather than handed on to a ``trust_remote_code`` load (vLLM) that would run them.

    Raises:
        InputNotFoundError: the directory, its config.json or its weights are missing.
        NemoforgeError: the checkpoint is neither a Llama nor a nemotron-nas model, or its Python files are not
            the ones this nemoforge ships.
    """
    path = check_hf_dir(Path(path))
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == "nemotron-nas":
        verify_remote_code(path)
        return DeciLMForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if model_type == "llama":
        return llama_to_decilm(LlamaForCausalLM.from_pretrained(path, dtype=dtype))
    raise NemoforgeError(
        f"{path}: model_type {model_type!r} is not supported (expected 'llama' or 'nemotron-nas')"
    )


@torch.no_grad()
def child_from_parent(
    parent: DeciLMForCausalLM,
    block_configs: Sequence[BlockConfig],
    ffn_channels: Mapping[int, torch.Tensor] | None = None,
) -> DeciLMForCausalLM:
    """A child with ``block_configs``, initialized from an all-parent model's weights.

    Embeddings, final norm and LM head are copied. Per layer: a kept attention copies Q/O and the norm and
    mean-pools the parent's K/V heads within each new group (the GQA init of Puzzle §4.1 / Minitron); a kept FFN
    copies the norm and the parent's channels ``ffn_channels[layer]`` (default: the first I channels).

    Args:
        parent: an all-parent model (every sub-block present).
        block_configs: the child's architecture (same length as the parent's layers).
        ffn_channels: per layer, the parent FFN channel indices to keep (LongTensor of length I), e.g. by importance.

    Raises:
        ValueError: the parent lacks a sub-block the child keeps, the child asks for more KV heads or FFN channels
            than the parent has, or the KV-head counts do not nest.
    """
    config = copy.deepcopy(parent.config)
    config.block_configs = [BlockConfig.from_dict(copy.deepcopy(b)) for b in block_configs]
    config = DeciLMConfig.from_dict(config.to_dict())  # re-validates the new block_configs
    child = DeciLMForCausalLM(config).to(device=parent.device, dtype=parent.dtype)
    child.model.embed_tokens.weight.copy_(parent.model.embed_tokens.weight)
    child.model.norm.weight.copy_(parent.model.norm.weight)
    if not config.tie_word_embeddings:
        child.lm_head.weight.copy_(parent.lm_head.weight)
    for i, (p_layer, c_layer) in enumerate(zip(parent.model.layers, child.model.layers, strict=True)):
        if c_layer.self_attn is not None:
            if p_layer.self_attn is None:
                raise ValueError(f"layer {i}: the parent has no attention to initialize the child's from")
            c_layer.input_layernorm.load_state_dict(p_layer.input_layernorm.state_dict())
            _init_attention(p_layer.self_attn, c_layer.self_attn, i)
        if c_layer.mlp is not None:
            if p_layer.mlp is None:
                raise ValueError(f"layer {i}: the parent has no FFN to initialize the child's from")
            c_layer.post_attention_layernorm.load_state_dict(p_layer.post_attention_layernorm.state_dict())
            channels = None if ffn_channels is None else ffn_channels.get(i)
            _init_mlp(p_layer.mlp, c_layer.mlp, channels, i)
    child.generation_config = copy.deepcopy(parent.generation_config)
    return child.eval()


def _init_attention(parent_attn, child_attn, layer_idx: int) -> None:
    p_kv, c_kv = parent_attn.num_key_value_heads, child_attn.num_key_value_heads
    if c_kv > p_kv or p_kv % c_kv:
        raise ValueError(f"layer {layer_idx}: cannot pool {p_kv} parent KV heads into {c_kv}")
    child_attn.q_proj.load_state_dict(parent_attn.q_proj.state_dict())
    child_attn.o_proj.load_state_dict(parent_attn.o_proj.state_dict())
    Dh = parent_attn.head_dim
    for name in ("k_proj", "v_proj"):
        src, dst = getattr(parent_attn, name), getattr(child_attn, name)
        # (p_kv * Dh, D) -> (c_kv, p_kv / c_kv, Dh, D): consecutive parent heads form one child group, since a
        # query head h reads KV head h // n_heads_in_group in both models.
        dst.weight.copy_(src.weight.view(c_kv, p_kv // c_kv, Dh, -1).mean(1).reshape_as(dst.weight))
        if src.bias is not None:
            dst.bias.copy_(src.bias.view(c_kv, p_kv // c_kv, Dh).mean(1).reshape_as(dst.bias))


def _init_mlp(parent_mlp, child_mlp, channels: torch.Tensor | None, layer_idx: int) -> None:
    I_parent, I_child = parent_mlp.intermediate_size, child_mlp.intermediate_size
    if channels is None:
        if I_child > I_parent:
            raise ValueError(f"layer {layer_idx}: child FFN width {I_child} exceeds the parent's {I_parent}")
        channels = torch.arange(I_child)
    if channels.shape != (I_child,):
        raise ValueError(
            f"layer {layer_idx}: {tuple(channels.shape)} channel indices for FFN width {I_child}"
        )
    channels = channels.to(parent_mlp.gate_proj.weight.device)
    for name in ("gate_proj", "up_proj"):
        src, dst = getattr(parent_mlp, name), getattr(child_mlp, name)
        dst.weight.copy_(src.weight[channels])
        if src.bias is not None:
            dst.bias.copy_(src.bias[channels])
    child_mlp.down_proj.weight.copy_(parent_mlp.down_proj.weight[:, channels])
    if parent_mlp.down_proj.bias is not None:
        child_mlp.down_proj.bias.copy_(parent_mlp.down_proj.bias)
