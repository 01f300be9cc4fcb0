"""Block library construction and Channel Contribution pruning (Puzzle §2, App. A) on literal inputs."""

from __future__ import annotations

import pytest
import torch

from nemoforge.config import NASConfig
from nemoforge.errors import RecipeError
from nemoforge.models.block_configs import intermediate_size
from nemoforge.models.convert import decilm_config_from_llama
from nemoforge.models.hf.configuration_decilm import DeciLMConfig
from nemoforge.models.hf.modeling_decilm import DeciLMMLP
from nemoforge.stages.nas.library import (
    Variant,
    build_library,
    channel_contribution,
    ffn_intermediate,
    prune_mlp,
    top_channels,
)


def tiny_config(hidden: int = 64, ffn: int = 768, layers: int = 4) -> DeciLMConfig:
    from transformers import LlamaConfig

    llama = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return decilm_config_from_llama(llama)


def test_channel_contribution_literal() -> None:
    # Three channels over two tokens: mean |X| = [2, 0, 2]; ||W_down[:, c]|| = [1, 5, 0.5] -> C = [2, 0, 1].
    x_NI = torch.tensor([[1.0, 0.0, 2.0], [-3.0, 0.0, -2.0]])
    down_DI = torch.tensor([[1.0, 3.0, 0.3], [0.0, 4.0, 0.4]])
    contribution = channel_contribution(x_NI.abs().mean(0), down_DI)
    assert torch.allclose(contribution, torch.tensor([2.0, 0.0, 1.0]))
    # Channel 1 has the largest weights but never fires; channel 2 fires as much as 0 but writes little.
    assert top_channels(contribution, 2).tolist() == [0, 2]
    assert top_channels(contribution, 1).tolist() == [0]


def test_prune_mlp_keeps_rows_and_columns_of_top_channels() -> None:
    config = tiny_config(hidden=4, ffn=256)
    mlp = DeciLMMLP(config, 6)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).view_as(p))
    channels = torch.tensor([1, 4])
    state = prune_mlp(mlp, channels)
    assert torch.equal(state["gate_proj.weight"], mlp.gate_proj.weight[[1, 4]])
    assert torch.equal(state["up_proj.weight"], mlp.up_proj.weight[[1, 4]])
    assert torch.equal(state["down_proj.weight"], mlp.down_proj.weight[:, [1, 4]])
    narrow = DeciLMMLP(config, 2)
    narrow.load_state_dict(state)
    # The narrow FFN's output is exactly the parent's restricted to the kept channels' contributions.
    x_ND = torch.randn(5, 4)
    expected = ffn_intermediate(mlp, x_ND)[:, [1, 4]] @ mlp.down_proj.weight[:, [1, 4]].T
    assert torch.allclose(narrow(x_ND), expected, atol=1e-4)


def test_library_variants_per_layer() -> None:
    library = build_library(tiny_config(), NASConfig(ffn_intermediate_sizes=[256, 512]))
    assert library.ffn_sizes == (512, 256) and library.parent_ffn_size == 768
    ffn_options = {768, 512, 256, 0}
    # Layer 0 keeps its attention (keep_first_attention): 4 variants; the others 2 x 4.
    assert {v.ffn_size for v in library.variants[0]} == ffn_options
    assert not any(v.attention_no_op for v in library.variants[0])
    for row in library.variants[1:]:
        assert set(row) == {Variant(a, f) for a in (False, True) for f in ffn_options}
    for row in library.variants:
        assert row[0] == library.parent
        assert len({library.name(v) for v in row}) == len(row)
        for v in row:
            block = library.block_config(v)
            assert block.attention.no_op == v.attention_no_op
            assert intermediate_size(block.ffn, 64) == v.ffn_size  # ffn_mult round-trips to the width
            if not v.attention_no_op:
                assert block.attention.n_heads_in_group == 2
    assert (
        library.name(Variant(False, 512))
        == "attention = 2 kv heads (parent) && ffn = intermediate size 512 (parent * 67%)"
    )
    assert library.name(Variant(True, 0)) == "attention = no_op && ffn = no_op"


def test_library_switches() -> None:
    nas = NASConfig(ffn_intermediate_sizes=[512], attention_no_op=False, ffn_no_op=False)
    library = build_library(tiny_config(), nas)
    assert all(row == (Variant(False, 768), Variant(False, 512)) for row in library.variants)
    nas = NASConfig(ffn_intermediate_sizes=[512], keep_first_attention=False)
    assert any(v.attention_no_op for v in build_library(tiny_config(), nas).variants[0])


def test_library_rejects_width_not_below_parent() -> None:
    with pytest.raises(
        RecipeError, match=r"nas\.ffn_intermediate_sizes\[1\]=768 must be below the parent's FFN width 768"
    ):
        build_library(tiny_config(), NASConfig(ffn_intermediate_sizes=[512, 768]))
