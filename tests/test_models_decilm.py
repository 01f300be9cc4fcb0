"""DeciLM config schema, block_configs arithmetic, and Llama -> DeciLM conversion parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nemoforge.models.block_configs import (
    block_config,
    count_params,
    ffn_mult_for,
    intermediate_size,
    kv_cache_bytes_per_token,
    parent_block_configs,
    summarize,
)
from nemoforge.models.convert import (
    child_from_parent,
    decilm_config_from_llama,
    llama_to_decilm,
    load_causal_lm,
)
from nemoforge.models.hf.configuration_decilm import (
    AttentionConfig,
    BlockConfig,
    DeciLMConfig,
    FFNConfig,
    ffn_mult_to_intermediate_size,
)
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM

# Hidden 64, parent FFN 768, 4 heads / 2 KV heads (n_heads_in_group 2): the tiny_llama_dir fixture's shape.
# Layer 1 drops attention and narrows the FFN, layer 2 pools to 1 KV head and drops its FFN, layer 3 narrows.
CHILD_WIDTHS = [(2, 768), (None, 512), (4, None), (2, 256)]


def child_blocks(widths=CHILD_WIDTHS, hidden_size: int = 64) -> list[BlockConfig]:
    return [block_config(group, ffn, hidden_size) for group, ffn in widths]


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def input_ids(tiny_llama: LlamaForCausalLM) -> torch.Tensor:
    return torch.randint(0, tiny_llama.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------- ffn_mult
@pytest.mark.parametrize(
    ("hidden", "width", "mult"),
    [(576, 1536, 4.0), (576, 1024, 2.666667), (576, 512, 1.333333), (4096, 14336, 5.25)],
)
def test_ffn_mult_round_trip(hidden: int, width: int, mult: float) -> None:
    assert ffn_mult_for(width, hidden) == mult
    assert ffn_mult_to_intermediate_size(mult, hidden) == width


def test_ffn_mult_formula_truncates_then_rounds_up() -> None:
    assert ffn_mult_to_intermediate_size(2.6667, 576) == 1024  # int(1024.0128) = 1024
    assert ffn_mult_to_intermediate_size(2.666, 576) == 1024  # int(1023.744) = 1023 -> up to 1024
    assert ffn_mult_to_intermediate_size(1.3125, 8192) == 7168
    with pytest.raises(ValueError, match="multiple of 256"):
        ffn_mult_for(1000, 576)


# --------------------------------------------------------------------------------------------- schema
def test_block_configs_have_attribute_access_and_serialize_as_dicts() -> None:
    blocks = [
        {"attention": {"no_op": False, "n_heads_in_group": 3}, "ffn": {"no_op": False, "ffn_mult": 4.0}},
        {"attention": {"no_op": True, "sparsify": None, "window_length": None}, "ffn": {"no_op": True}},
    ]
    config = DeciLMConfig(hidden_size=576, num_attention_heads=9, num_hidden_layers=2, block_configs=blocks)
    assert config.block_configs[0].attention.n_heads_in_group == 3
    assert config.block_configs[0].ffn.ffn_mult == 4.0
    assert config.block_configs[1].attention.no_op and config.block_configs[1].ffn.no_op
    assert config.intermediate_size is None and config.num_key_value_heads is None
    assert [config.num_key_value_heads_of(i) for i in range(2)] == [3, 0]
    assert [config.intermediate_size_of(i) for i in range(2)] == [1536, 0]
    saved = json.loads(config.to_json_string())
    assert saved["model_type"] == "nemotron-nas"
    assert saved["block_configs"][1] == {
        "attention": {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None},
        "ffn": {"no_op": True, "replace_with_linear": False, "ffn_mult": None},
    }
    assert DeciLMConfig.from_dict(saved).block_configs == config.block_configs


def test_ffn_given_by_intermediate_size_loads_without_an_ffn_mult_attribute() -> None:
    """Published Nemotron checkpoints give some FFN widths as ``intermediate_size``; vLLM reads it when
    ``hasattr(ffn, "ffn_mult")`` is False, so such a block must not grow an ``ffn_mult``."""
    blocks = [
        {"attention": {"n_heads_in_group": 2}, "ffn": {"no_op": False, "intermediate_size": 96}},
        {"attention": {"no_op": True}, "ffn": {"ffn_mult": 4.0, "intermediate_size": 256}},  # agree
        {"attention": {"no_op": True}, "ffn": {"ffn_mult": 4.0}},
    ]
    config = DeciLMConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=3, block_configs=blocks)
    ffn = config.block_configs[0].ffn
    assert not hasattr(ffn, "ffn_mult") and ffn.intermediate_size == 96
    assert [config.intermediate_size_of(i) for i in range(3)] == [96, 256, 256]
    saved = json.loads(config.to_json_string())
    assert saved["block_configs"][0]["ffn"] == {
        "no_op": False,
        "replace_with_linear": False,
        "intermediate_size": 96,
    }
    assert saved["block_configs"][1]["ffn"]["intermediate_size"] == 256
    assert "intermediate_size" not in saved["block_configs"][2]["ffn"]
    reloaded = DeciLMConfig.from_dict(saved)
    assert (
        reloaded.block_configs == config.block_configs
        and reloaded.block_configs[0] != config.block_configs[1]
    )
    assert summarize(config.block_configs, 64) == "attn 1/3, ffn {256: 2, 96: 1}"
    model = DeciLMForCausalLM(config)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (96, 64)


def test_ffn_mult_and_intermediate_size_that_disagree_name_the_layer() -> None:
    blocks = [
        {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 4.0}},
        {"attention": {"no_op": True}, "ffn": {"ffn_mult": 4.0, "intermediate_size": 512}},
    ]
    with pytest.raises(ValueError, match="layer 1 ffn gives ffn_mult=4.0") as err:
        DeciLMConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, block_configs=blocks)
    assert "\n" not in str(err.value) and "intermediate_size=512" in str(err.value)


@pytest.mark.parametrize(
    ("blocks", "kwargs", "match"),
    [
        ([{"attention": {"replace_with_linear": True}, "ffn": {"ffn_mult": 1.0}}], {}, "replace_with_linear"),
        (
            [{"attention": {"n_heads_in_group": 1}, "ffn": {"replace_with_linear": True}}],
            {},
            "replace_with_linear",
        ),
        ([{"attention": {"n_heads_in_group": 3}, "ffn": {"ffn_mult": 1.0}}], {}, "does not divide"),
        ([{"attention": {}, "ffn": {"ffn_mult": 1.0}}], {}, "n_heads_in_group"),
        ([{"attention": {"n_heads_in_group": 1}, "ffn": {}}], {}, "ffn_mult"),
        ([{"attention": {"n_heads_in_group": 1}, "ffn": {"intermediate_size": 0}}], {}, "intermediate_size"),
        (
            [{"attention": {"n_heads_in_group": 1, "window_length": 128}, "ffn": {"ffn_mult": 1.0}}],
            {},
            "unsupported",
        ),
        ([], {}, "0 block_configs for 1 layers"),
        (
            [{"attention": {"n_heads_in_group": 1}, "ffn": {"ffn_mult": 1.0}}],
            {"intermediate_size": 256},
            "per layer",
        ),
    ],
)
def test_invalid_block_configs_raise(blocks: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DeciLMConfig(
            hidden_size=64, num_attention_heads=4, num_hidden_layers=1, block_configs=blocks, **kwargs
        )


def test_block_config_helpers() -> None:
    smollm2 = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    blocks = parent_block_configs(smollm2)
    assert len(blocks) == 30 and blocks[0] == BlockConfig(
        AttentionConfig(n_heads_in_group=3), FFNConfig(ffn_mult=4.0)
    )
    assert blocks[0] is not blocks[1]
    assert (
        intermediate_size(blocks[0].ffn, 576) == 1536 and intermediate_size(FFNConfig(no_op=True), 576) == 0
    )
    config = decilm_config_from_llama(smollm2)
    assert count_params(config) == 134_515_008  # SmolLM2-135M (tied): machine-notes "134.5M params"
    assert kv_cache_bytes_per_token(config) == 30 * 2 * 3 * 64 * 2
    blocks[5] = block_config(None, 1024, 576)
    blocks[6] = block_config(3, None, 576)
    assert summarize(blocks, 576) == "attn 29/30, ffn {1536: 28, 1024: 1, no_op: 1}"
    assert summarize(blocks) == "attn 29/30, ffn {x4.0: 28, x2.666667: 1, no_op: 1}"


def test_count_params_matches_the_model() -> None:
    for tie, bias in ((True, False), (False, True)):
        config = DeciLMConfig(
            vocab_size=100,
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=4,
            tie_word_embeddings=tie,
            attention_bias=bias,
            mlp_bias=bias,
            block_configs=child_blocks(),
        )
        model = DeciLMForCausalLM(config)
        assert count_params(config) == sum(p.numel() for p in model.parameters())
        assert kv_cache_bytes_per_token(config, kv_bytes=4) == (2 + 0 + 1 + 2) * 2 * 16 * 4


# ---------------------------------------------------------------------------------------- conversion
def test_all_parent_conversion_is_exact(tiny_llama: LlamaForCausalLM, input_ids: torch.Tensor) -> None:
    model = llama_to_decilm(tiny_llama)
    assert model.config.model_type == "nemotron-nas"
    assert summarize(model.config.block_configs, 64) == "attn 4/4, ffn {768: 4}"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    mask = torch.ones_like(input_ids)
    mask[1, :5] = 0  # left padding on row 1
    labels = input_ids.clone()
    labels[
        1, :6
    ] = -100  # targets predicted from padding positions (whose outputs are implementation-defined)
    with torch.no_grad():
        ref = tiny_llama(input_ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        out = model(input_ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    assert (out.logits[0] - ref.logits[0]).abs().max() < 1e-5
    assert (out.logits[1, 5:] - ref.logits[1, 5:]).abs().max() < 1e-5
    assert torch.isfinite(out.logits).all()  # padding rows too
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    assert len(out.hidden_states) == len(ref.hidden_states) == 5
    for h, h_ref in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert (h[0] - h_ref[0]).abs().max() < 1e-5


def test_sub_block_helpers(tiny_llama: LlamaForCausalLM, input_ids: torch.Tensor) -> None:
    model = llama_to_decilm(tiny_llama)
    ref_layer = tiny_llama.model.layers[0]
    layer = model.model.layers[0]
    hidden_BTD = model.model.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1])[None]
    pos_emb = model.model.rotary_emb(hidden_BTD, position_ids)
    with torch.no_grad():
        out = layer.ffn_block(layer.attention_block(hidden_BTD, pos_emb))
        ref = ref_layer(
            hidden_BTD, attention_mask=None, position_embeddings=pos_emb, position_ids=position_ids
        )
    assert (out - ref).abs().max() < 1e-5


def masked_llama_equivalent(llama: LlamaForCausalLM, widths=CHILD_WIDTHS) -> LlamaForCausalLM:
    """An independent reference for ``child_from_parent``: the parent Llama with the child's cuts done by
    zeroing (no-op attention: o_proj = 0; no-op FFN: down_proj = 0; FFN width I: down_proj columns >= I = 0) and
    KV heads replaced by their group mean (n_heads_in_group 4 on a 2-KV-head parent: both heads = their mean)."""
    ref = LlamaForCausalLM(llama.config).eval()
    ref.load_state_dict(llama.state_dict())
    head_dim = llama.config.head_dim
    with torch.no_grad():
        for layer, (group, width) in zip(ref.model.layers, widths, strict=True):
            if group is None:
                layer.self_attn.o_proj.weight.zero_()
            elif group == 4:
                for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                    w = proj.weight.view(2, head_dim, -1)
                    w.copy_(w.mean(0, keepdim=True).expand_as(w))
            if width is None:
                layer.mlp.down_proj.weight.zero_()
            else:
                layer.mlp.down_proj.weight[:, width:] = 0
    return ref


def test_child_from_parent_matches_an_independent_reference(
    tiny_llama: LlamaForCausalLM, input_ids: torch.Tensor
) -> None:
    child = child_from_parent(llama_to_decilm(tiny_llama), child_blocks())
    layers = child.model.layers
    assert (
        layers[1].self_attn is None
        and layers[1].input_layernorm is None
        and layers[1].mlp.intermediate_size == 512
    )
    assert layers[2].mlp is None and layers[2].post_attention_layernorm is None
    assert layers[2].self_attn.num_key_value_heads == 1 and layers[3].mlp.intermediate_size == 256
    assert [layer.self_attn.cache_idx for layer in layers if layer.self_attn is not None] == [0, 1, 2]
    ref = masked_llama_equivalent(tiny_llama)
    with torch.no_grad():
        assert (child(input_ids).logits - ref(input_ids).logits).abs().max() < 1e-5


def test_llama3_rope_scaling_matches_llama() -> None:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    torch.manual_seed(0)
    llama = LlamaForCausalLM(config).eval()
    model = llama_to_decilm(llama)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - llama(ids).logits).abs().max() < 1e-5


def test_training_step_and_gradient_checkpointing(
    tiny_llama: LlamaForCausalLM, input_ids: torch.Tensor
) -> None:
    """Gradients reach every parameter of a heterogeneous child, the same with gradient checkpointing."""
    grads = []
    for checkpointing in (False, True):
        child = child_from_parent(llama_to_decilm(tiny_llama), child_blocks()).train()
        if checkpointing:
            child.gradient_checkpointing_enable()
        child(input_ids, labels=input_ids).loss.backward()
        grads.append({n: p.grad for n, p in child.named_parameters()})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0].values())
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    with pytest.raises(ValueError, match="output_attentions"):
        child(input_ids, output_attentions=True)


def test_load_causal_lm_converts_a_llama_dir(tiny_llama_dir: Path, tiny_llama: LlamaForCausalLM) -> None:
    model = load_causal_lm(tiny_llama_dir)
    assert isinstance(model, DeciLMForCausalLM) and not model.training
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert (model(ids).logits - tiny_llama(ids).logits).abs().max() < 1e-5


def test_load_causal_lm_rejects_a_missing_dir(tmp_path: Path) -> None:
    from nemoforge.errors import InputNotFoundError

    with pytest.raises(InputNotFoundError, match="does not exist"):
        load_causal_lm(tmp_path / "nope")


@pytest.mark.slow
def test_smollm2_all_parent_conversion_is_exact(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    llama = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    model = llama_to_decilm(llama)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (model(ids).logits - llama(ids).logits).abs().max() < 1e-5
    assert count_params(model.config) == sum(p.numel() for p in model.parameters())
