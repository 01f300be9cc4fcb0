"""The block library: per layer, the child blocks the search may pick (Puzzle §2 and App. A, arXiv 2411.19146).

Search space per layer ``i`` (Puzzle §2, restricted to what stock vLLM serves, recipe.md §3.4 and §6):

    attention in {parent GQA, no_op}          (no_op never at layer 0 when ``nas.keep_first_attention``)
    FFN       in {parent width, each width of ``nas.ffn_intermediate_sizes``, no_op}

Narrow FFNs start from the parent's FFN pruned by Channel Contribution (Puzzle App. A): channel ``c`` of the
intermediate activation ``X = act(gate(x)) * up(x)`` scores ``C_c = mean_t |X_tc| * ||W_down[:, c]||_2``; the
highest-scoring channels are kept (rows of ``gate_proj``/``up_proj``, columns of ``down_proj``).

Shape legend: N tokens, D hidden_size, I FFN intermediate size, W a narrow width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemoforge.config import NASConfig
from nemoforge.errors import NemoforgeError, RecipeError
from nemoforge.models.block_configs import block_config
from nemoforge.models.hf.configuration_decilm import BlockConfig, DeciLMConfig
from nemoforge.models.hf.modeling_decilm import DeciLMMLP


@dataclass(frozen=True, order=True)
class Variant:
    """One child block: an (attention, FFN) pair for one layer.

    Attributes:
        attention_no_op: True = attention removed; False = the parent's GQA attention.
        ffn_size: FFN intermediate size in channels; 0 = FFN removed (no_op).
    """

    attention_no_op: bool
    ffn_size: int


@dataclass(frozen=True)
class BlockLibrary:
    """The search space of one parent: its shape and, per layer, the variants (parent variant first).

    Attributes:
        hidden_size: D.
        num_layers: L.
        n_heads_in_group: the parent's GQA group size (query heads per KV head).
        num_kv_heads: the parent's KV heads per attention layer.
        parent_ffn_size: the parent's FFN intermediate size.
        ffn_sizes: narrow widths, descending.
        variants: per layer, its variants; ``variants[i][0]`` is the parent block.
    """

    hidden_size: int
    num_layers: int
    n_heads_in_group: int
    num_kv_heads: int
    parent_ffn_size: int
    ffn_sizes: tuple[int, ...]
    variants: tuple[tuple[Variant, ...], ...]

    @property
    def parent(self) -> Variant:
        return Variant(attention_no_op=False, ffn_size=self.parent_ffn_size)

    def is_parent(self, variant: Variant) -> bool:
        return variant == self.parent

    def block_config(self, variant: Variant) -> BlockConfig:
        """The variant as a ``block_configs`` entry (``ffn_mult`` round-trip checked by ``block_config``)."""
        return block_config(
            None if variant.attention_no_op else self.n_heads_in_group,
            variant.ffn_size or None,
            self.hidden_size,
        )

    def name(self, variant: Variant) -> str:
        """A key in NVlabs/puzzle's block-library style, e.g.
        ``"attention = 3 kv heads (parent) && ffn = intermediate size 1024 (parent * 67%)"``."""
        attention = "no_op" if variant.attention_no_op else f"{self.num_kv_heads} kv heads (parent)"
        if variant.ffn_size == 0:
            ffn = "no_op"
        elif variant.ffn_size == self.parent_ffn_size:
            ffn = f"intermediate size {variant.ffn_size} (parent)"
        else:
            ffn = f"intermediate size {variant.ffn_size} (parent * {100 * variant.ffn_size / self.parent_ffn_size:.0f}%)"
        return f"attention = {attention} && ffn = {ffn}"


def build_library(config: DeciLMConfig, nas: NASConfig) -> BlockLibrary:
    """The block library of an all-parent model under ``recipe.nas``.

    Raises:
        NemoforgeError: the parent is not uniform (a layer lacks a sub-block or differs from layer 0).
        RecipeError: a width of ``nas.ffn_intermediate_sizes`` is not below the parent's FFN width.
    """
    blocks = config.block_configs
    first = blocks[0]
    if any(b.attention.no_op or b.ffn.no_op or b != first for b in blocks):
        raise NemoforgeError(
            "the nas parent must be a uniform model (every layer with the same attention and FFN, as a Llama); "
            "this one has heterogeneous block_configs: search from the original Llama parent instead"
        )
    parent_ffn_size = config.intermediate_size_of(0)
    for k, width in enumerate(nas.ffn_intermediate_sizes):
        if width >= parent_ffn_size:
            raise RecipeError(
                f"nas.ffn_intermediate_sizes[{k}]={width} must be below the parent's FFN width {parent_ffn_size}: "
                f"list narrower widths only (multiples of 256 below {parent_ffn_size})"
            )
    ffn_sizes = tuple(sorted(nas.ffn_intermediate_sizes, reverse=True))
    ffn_options = (parent_ffn_size, *ffn_sizes, *((0,) if nas.ffn_no_op else ()))
    rows = []
    for layer_idx in range(config.num_hidden_layers):
        attention_options = (False,)
        if nas.attention_no_op and not (layer_idx == 0 and nas.keep_first_attention):
            attention_options = (False, True)
        rows.append(tuple(Variant(a, f) for a in attention_options for f in ffn_options))
    library = BlockLibrary(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        n_heads_in_group=first.attention.n_heads_in_group,
        num_kv_heads=config.num_key_value_heads_of(0),
        parent_ffn_size=parent_ffn_size,
        ffn_sizes=ffn_sizes,
        variants=tuple(rows),
    )
    for width in ffn_sizes:  # fail before any compute when a width has no exact ffn_mult
        try:
            library.block_config(Variant(False, width))
        except ValueError as err:
            raise RecipeError(f"nas.ffn_intermediate_sizes: {err}") from None
    return library


# ----------------------------------------------------------------------------- Channel Contribution (App. A)
def ffn_intermediate(mlp: DeciLMMLP, normed_ND: torch.Tensor) -> torch.Tensor:
    """The FFN's intermediate activation ``X = act(gate(x)) * up(x)``, shape (N, I)."""
    return mlp.act_fn(mlp.gate_proj(normed_ND)) * mlp.up_proj(normed_ND)


def channel_contribution(mean_abs_intermediate_I: torch.Tensor, down_weight_DI: torch.Tensor) -> torch.Tensor:
    """Channel Contribution ``C_c = mean_t |X_tc| * ||W_down[:, c]||_2`` (Puzzle App. A), shape (I,).

    Args:
        mean_abs_intermediate_I: ``mean_t |X_tc|`` over calibration tokens.
        down_weight_DI: ``down_proj.weight`` (D, I); column ``c`` is what channel ``c`` writes to the residual.
    """
    return mean_abs_intermediate_I * down_weight_DI.float().norm(dim=0)


def top_channels(contribution_I: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the ``width`` highest-contribution channels, ascending (LongTensor (W,))."""
    return contribution_I.topk(width).indices.sort().values


def prune_mlp(mlp: DeciLMMLP, channels_W: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weights of the FFN narrowed to ``channels_W``: ``gate_proj``/``up_proj`` rows, ``down_proj`` columns.

    Returns:
        A ``DeciLMMLP`` state dict (``gate_proj.weight`` (W, D), ``up_proj.weight`` (W, D), ``down_proj.weight``
        (D, W), biases when the parent has them), detached copies.
    """
    state = {}
    for name, module in (("gate_proj", mlp.gate_proj), ("up_proj", mlp.up_proj)):
        state[f"{name}.weight"] = module.weight[channels_W].detach().clone()
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias[channels_W].detach().clone()
    state["down_proj.weight"] = mlp.down_proj.weight[:, channels_W].detach().clone()
    if mlp.down_proj.bias is not None:
        state["down_proj.bias"] = mlp.down_proj.bias.detach().clone()
    return state
