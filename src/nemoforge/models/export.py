"""Export a ``DeciLMForCausalLM`` as a nemotron-nas checkpoint that transformers and stock vLLM load.

Layout of ``out_dir`` (../shared/reference/recipe.md §3.7, machine-notes "Stock vLLM on nemotron-nas exports"):

    config.json                 architectures ["DeciLMForCausalLM"], model_type "nemotron-nas", auto_map,
                                block_configs (plain dicts), intermediate_size/num_key_value_heads null,
                                tie_word_embeddings written explicitly
    model.safetensors           Llama weight names; no tensor of a no_op sub-block (norm included); sharded
                                with model.safetensors.index.json above ``max_shard_bytes``
    configuration_decilm.py     our config module   (auto_map AutoConfig)
    modeling_decilm.py          our modeling module (auto_map AutoModelForCausalLM)
    generation_config.json, tokenizer files, chat template

Both silent failures of vLLM are prevented here: a config without ``tie_word_embeddings`` loads an all-zero head,
and a missing ``o_proj`` loads silently; so the key is always written and the tensor set is checked exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from nemoforge.models.hf import configuration_decilm, modeling_decilm
from nemoforge.models.hf.configuration_decilm import DeciLMConfig
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM

AUTO_MAP = {
    "AutoConfig": "configuration_decilm.DeciLMConfig",
    "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def expected_tensor_shapes(config: DeciLMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a complete checkpoint of ``config`` holds, by Llama name, with its shape.

    A tied LM head is not stored (``lm_head.weight`` only when ``tie_word_embeddings`` is False).
    """
    D, H, Dh, V = config.hidden_size, config.num_attention_heads, config.head_dim, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        K = config.num_key_value_heads_of(i)
        if K:
            shapes[f"{prefix}.input_layernorm.weight"] = (D,)
            for name, rows in (("q_proj", H * Dh), ("k_proj", K * Dh), ("v_proj", K * Dh)):
                shapes[f"{prefix}.self_attn.{name}.weight"] = (rows, D)
                if config.attention_bias:
                    shapes[f"{prefix}.self_attn.{name}.bias"] = (rows,)
            shapes[f"{prefix}.self_attn.o_proj.weight"] = (D, H * Dh)
            if config.attention_bias:
                shapes[f"{prefix}.self_attn.o_proj.bias"] = (D,)
        I = config.intermediate_size_of(i)
        if I:
            shapes[f"{prefix}.post_attention_layernorm.weight"] = (D,)
            for name, shape in (("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I))):
                shapes[f"{prefix}.mlp.{name}.weight"] = shape
                if config.mlp_bias:
                    shapes[f"{prefix}.mlp.{name}.bias"] = (shape[0],)
    return shapes


def check_complete(state: dict[str, torch.Tensor], config: DeciLMConfig) -> None:
    """Raise ValueError unless ``state`` holds exactly the tensors of ``expected_tensor_shapes(config)``."""
    expected = expected_tensor_shapes(config)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    )
    problems = [
        f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} ({len(names)})"
        for label, names in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
        if names
    ]
    if problems:
        raise ValueError("refusing to write an incomplete checkpoint: " + "; ".join(problems))


def export_checkpoint(
    model: DeciLMForCausalLM, tokenizer, out_dir: Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """Write ``model`` + ``tokenizer`` to ``out_dir`` as a servable nemotron-nas checkpoint (layout above).

    Args:
        model: the model to export (its weights are written in their current dtype).
        tokenizer: a transformers tokenizer; saved with its chat template.
        out_dir: target directory (created; existing files of the same names are overwritten).
        max_shard_bytes: safetensors shard size limit in bytes.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: a tensor of a kept sub-block is missing or has the wrong shape, a removed sub-block still has
            tensors, or a tied model's LM head differs from its embeddings. Checked before anything is written.
    """
    config = model.config
    state = {k: v for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        head = state.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, state["model.embed_tokens.weight"]):
            raise ValueError(
                "tie_word_embeddings is set but lm_head.weight differs from model.embed_tokens.weight"
            )
    check_complete(state, config)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_safetensors(state, out_dir, max_shard_bytes)
    (out_dir / "config.json").write_text(
        json.dumps(export_config_dict(model), indent=2, sort_keys=True) + "\n"
    )
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    for module in (configuration_decilm, modeling_decilm):
        shutil.copyfile(module.__file__, out_dir / Path(module.__file__).name)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def export_config_dict(model: DeciLMForCausalLM) -> dict:
    """The config.json content of an export: the full config with the serving keys set explicitly."""
    config_dict = model.config.to_dict()
    for key in ("_name_or_path", "_attn_implementation_autoset", "auto_map"):
        config_dict.pop(key, None)
    config_dict.update(
        architectures=["DeciLMForCausalLM"],
        model_type="nemotron-nas",
        auto_map=dict(AUTO_MAP),
        tie_word_embeddings=bool(model.config.tie_word_embeddings),
        intermediate_size=None,
        num_key_value_heads=None,
        dtype=str(model.dtype).removeprefix("torch."),
    )
    return config_dict


def _save_safetensors(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    names = sorted(state)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name in names:
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards, strict=True):
        save_file(
            {n: state[n].detach().contiguous() for n in shard}, out_dir / file, metadata={"format": "pt"}
        )
        weight_map.update({n: file for n in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
