"""Export: a nemotron-nas checkpoint that reloads through auto_map to identical logits, and nothing incomplete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from nemoforge.models.block_configs import block_config
from nemoforge.models.convert import child_from_parent, llama_to_decilm, load_causal_lm
from nemoforge.models.export import check_complete, expected_tensor_shapes, export_checkpoint
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM

# Layer 1: no-op attention + FFN 512; layer 2: 1 KV head + no-op FFN; layer 3: FFN 256 (hidden 64, parent FFN 768).
CHILD_WIDTHS = [(2, 768), (None, 512), (4, None), (2, 256)]


@pytest.fixture(scope="module")
def parent(tiny_llama_dir: Path) -> DeciLMForCausalLM:
    return llama_to_decilm(LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))


@pytest.fixture(scope="module")
def child(parent: DeciLMForCausalLM) -> DeciLMForCausalLM:
    return child_from_parent(parent, [block_config(g, w, 64) for g, w in CHILD_WIDTHS])


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def tensor_names(out_dir: Path) -> set[str]:
    with safe_open(out_dir / "model.safetensors", framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("which", ["parent", "child"])
def test_export_reloads_with_trust_remote_code_to_identical_logits(
    which: str, parent, child, tokenizer, tmp_path: Path
) -> None:
    model = parent if which == "parent" else child
    out = export_checkpoint(model, tokenizer, tmp_path / which)
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "DeciLMForCausalLM"
    assert type(reloaded).__module__.startswith("transformers_modules")  # the copied file, not nemoforge's
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    # nemoforge's own loader reads the export too
    with torch.no_grad():
        assert torch.equal(load_causal_lm(out)(ids).logits, model(ids).logits)


def test_exported_files_config_and_tensors(child, tokenizer, tmp_path: Path) -> None:
    out = export_checkpoint(child, tokenizer, tmp_path / "child")
    for name in ("configuration_decilm.py", "modeling_decilm.py", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["model_type"] == "nemotron-nas"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_decilm.DeciLMConfig",
        "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
    }
    assert config["tie_word_embeddings"] is True
    assert config["intermediate_size"] is None and config["num_key_value_heads"] is None
    assert [b["attention"]["no_op"] for b in config["block_configs"]] == [False, True, False, False]
    assert [b["ffn"]["ffn_mult"] for b in config["block_configs"]] == [18.0, 12.0, None, 6.0]

    names = tensor_names(out)
    assert names == set(expected_tensor_shapes(child.config))
    assert "lm_head.weight" not in names  # tied
    assert not any(
        n.startswith(("model.layers.1.self_attn.", "model.layers.1.input_layernorm")) for n in names
    )
    assert not any(
        n.startswith(("model.layers.2.mlp.", "model.layers.2.post_attention_layernorm")) for n in names
    )
    assert (
        "model.layers.1.mlp.down_proj.weight" in names and "model.layers.2.self_attn.o_proj.weight" in names
    )
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.get_slice("model.layers.2.self_attn.k_proj.weight").get_shape() == [16, 64]
        assert f.get_slice("model.layers.3.mlp.up_proj.weight").get_shape() == [256, 64]

    # the chat template survives, and the tokenizer loads without trust_remote_code
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template is not None


def test_untied_export_writes_lm_head(parent, tokenizer, tmp_path: Path) -> None:
    config = parent.config.to_dict() | {"tie_word_embeddings": False}
    untied = DeciLMForCausalLM(type(parent.config).from_dict(config)).eval()
    out = export_checkpoint(untied, tokenizer, tmp_path / "untied")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in tensor_names(out)


def test_export_shards_large_checkpoints(child, tokenizer, tmp_path: Path) -> None:
    num_bytes = sum(p.numel() * p.element_size() for p in child.parameters())
    out = export_checkpoint(child, tokenizer, tmp_path / "sharded", max_shard_bytes=num_bytes // 2)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(expected_tensor_shapes(child.config))
    assert not (out / "model.safetensors").exists()
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.equal(load_causal_lm(out)(ids).logits, child(ids).logits)


def test_exporter_refuses_incomplete_or_extra_tensors(child, tokenizer, tmp_path: Path) -> None:
    state = {k: v for k, v in child.state_dict().items() if k != "lm_head.weight"}
    check_complete(state, child.config)
    missing = {k: v for k, v in state.items() if k != "model.layers.3.self_attn.o_proj.weight"}
    with pytest.raises(ValueError, match=r"missing: model\.layers\.3\.self_attn\.o_proj\.weight"):
        check_complete(missing, child.config)
    extra = state | {"model.layers.1.input_layernorm.weight": torch.ones(64)}
    with pytest.raises(ValueError, match=r"unexpected: model\.layers\.1\.input_layernorm\.weight"):
        check_complete(extra, child.config)
    wrong = state | {"model.layers.3.mlp.up_proj.weight": torch.zeros(512, 64)}
    with pytest.raises(ValueError, match="wrong shape"):
        check_complete(wrong, child.config)

    # through export_checkpoint: a removed module's weights break the checkpoint and nothing is written
    broken = child_from_parent(child, child.config.block_configs)
    del broken.model.layers[3].self_attn.o_proj
    broken.model.layers[3].self_attn.register_module("o_proj", None)
    with pytest.raises(ValueError, match="refusing to write an incomplete checkpoint"):
        export_checkpoint(broken, tokenizer, tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


def test_checkpoint_with_intermediate_size_instead_of_ffn_mult_loads(
    child, tokenizer, tmp_path: Path
) -> None:
    """A nemotron-nas config whose FFN blocks give ``intermediate_size`` (published Nemotron checkpoints do) loads
    in nemoforge and through the exported remote code; a block whose two widths disagree fails naming its layer."""
    out = export_checkpoint(child, tokenizer, tmp_path / "child")
    config = json.loads((out / "config.json").read_text())
    for i, block in enumerate(config["block_configs"]):
        if not block["ffn"]["no_op"]:
            block["ffn"]["intermediate_size"] = child.config.intermediate_size_of(i)
            del block["ffn"]["ffn_mult"]
    (out / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, child.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(load_causal_lm(out)(ids).logits, child(ids).logits)
        assert torch.equal(reloaded(ids).logits, child(ids).logits)
    config["block_configs"][3]["ffn"]["ffn_mult"] = 4.0  # 256 at hidden 64 vs intermediate_size 256: agree
    (out / "config.json").write_text(json.dumps(config))
    assert load_causal_lm(out).config.intermediate_size_of(3) == 256
    config["block_configs"][3]["ffn"]["ffn_mult"] = 12.0  # 512
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layer 3 ffn gives ffn_mult=12.0 .* intermediate_size=256"):
        load_causal_lm(out)
