"""KV-cached decoding: nemoforge's static-cache loop and transformers' generate equal uncached greedy decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from nemoforge.models.block_configs import block_config
from nemoforge.models.convert import child_from_parent, llama_to_decilm
from nemoforge.models.generate import FixedShapeDecodeStep, StaticKVCache, generate
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def parent(tiny_llama_dir: Path) -> DeciLMForCausalLM:
    return llama_to_decilm(LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))


@pytest.fixture(scope="module")
def child(parent: DeciLMForCausalLM) -> DeciLMForCausalLM:
    # Layer 0 without attention: cache slot 0 must still be an attention layer (cache length = tokens seen).
    widths = [(None, 512), (2, None), (4, 768), (2, 256)]
    return child_from_parent(parent, [block_config(g, w, 64) for g, w in widths])


@pytest.fixture(scope="module")
def prompt(parent: DeciLMForCausalLM) -> torch.Tensor:
    return torch.randint(0, parent.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))


def greedy_without_cache(model: DeciLMForCausalLM, ids_BT: torch.Tensor, num_new: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(num_new):
            next_B1 = model(ids_BT, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids_BT = torch.cat([ids_BT, next_B1], dim=1)
    return ids_BT


@pytest.mark.parametrize("which", ["parent", "child"])
def test_cached_decoding_equals_uncached_greedy(which: str, parent, child, prompt: torch.Tensor) -> None:
    model = parent if which == "parent" else child
    expected = greedy_without_cache(model, prompt, NEW_TOKENS)
    assert torch.equal(generate(model, prompt, NEW_TOKENS), expected)
    hf_out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
    )
    assert torch.equal(hf_out, expected)


def test_cached_logits_equal_full_forward(child, prompt: torch.Tensor) -> None:
    """Prefill in two chunks (a multi-token step on top of a cache needs the offset causal mask)."""
    with torch.no_grad():
        full = child(prompt).logits
        cache = StaticKVCache(child, 1, prompt.shape[1])
        first = child(prompt[:, :4], past_key_values=cache, use_cache=True).logits
        rest = child(prompt[:, 4:], past_key_values=cache, use_cache=True).logits
    assert cache.get_seq_length() == prompt.shape[1]
    assert (torch.cat([first, rest], dim=1) - full).abs().max() < 1e-5


def test_left_padded_batch_matches_single_prompts(child) -> None:
    gen = torch.Generator().manual_seed(3)
    short, long = (
        torch.randint(0, child.config.vocab_size, (1, 5), generator=gen),
        torch.randint(0, child.config.vocab_size, (1, 8), generator=gen),
    )
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    out = generate(child, batch, 6, attention_mask_BT=mask)
    assert torch.equal(out[0, 3:], generate(child, short, 6)[0])
    assert torch.equal(out[1], generate(child, long, 6)[0])


def test_fixed_shape_decode_step_equals_the_growing_cache(child) -> None:
    """The arithmetic of the CUDA-graph step (cache over all S_max slots + mask), run eagerly, left padding too."""
    gen = torch.Generator().manual_seed(4)
    batch = torch.randint(0, child.config.vocab_size, (2, 7), generator=gen)
    mask = torch.ones_like(batch)
    mask[0, :2] = 0
    num_new = 5
    expected = generate(child, batch, num_new, attention_mask_BT=mask)
    T = batch.shape[1]
    cache = StaticKVCache(child, 2, T + num_new)
    position_B1 = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:] + 1
    pad_mask_BS = torch.ones(2, T + num_new, dtype=torch.bool)
    pad_mask_BS[:, :T] = mask.bool()
    ids = batch
    with torch.no_grad():
        logits_BV = child(
            batch,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        step = FixedShapeDecodeStep(child, cache, pad_mask_BS, T, cuda_graph=False)
        for i in range(num_new):
            token_B = logits_BV.argmax(-1)
            ids = torch.cat([ids, token_B[:, None]], dim=1)
            logits_BV = step(token_B, position_B1 + i, T + i)
    assert torch.equal(ids, expected)


def test_fixed_shape_cache_takes_bf16_keys_over_fp32_weights(child) -> None:
    """rl decodes its fp32 policy under bf16 autocast: the fixed-shape write casts to the cache dtype (the H100 run's
    rl stage failed in index_copy_ before it did)."""
    cache = StaticKVCache(child, 2, 8)
    cache.write_pos_1 = torch.tensor([3])
    shape = cache.keys[0].shape
    k = torch.randn(shape[0], shape[1], 1, shape[3]).to(torch.bfloat16)
    keys, values = cache.update(k, k, 0)
    assert keys.dtype == torch.float32 and torch.equal(keys[:, :, 3:4], k.float())
    assert torch.count_nonzero(keys[:, :, :3]) == 0


def test_sampling_is_reproducible_and_eos_stops(parent, prompt: torch.Tensor) -> None:
    def sample(seed: int, **kwargs) -> torch.Tensor:
        return generate(
            parent,
            prompt.expand(3, -1),
            8,
            temperature=1.0,
            top_p=0.9,
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    first = generate(parent, prompt, 1)[0, -1].item()
    stopped = generate(parent, prompt, 8, eos_token_id=[first, 10**6])
    assert stopped.shape == (1, prompt.shape[1] + 1) and stopped[0, -1].item() == first


def test_top_p_keeps_only_the_nucleus(parent, prompt: torch.Tensor) -> None:
    """top_p tiny = greedy: only the most likely token is ever kept."""
    out = generate(parent, prompt, 6, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, generate(parent, prompt, 6))


def test_generate_validates_arguments(parent, prompt: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="top_p"):
        generate(parent, prompt, 4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="cuda_graph"):
        generate(parent, prompt, 4, cuda_graph=True)
    with pytest.raises(ValueError, match="holds"):
        StaticKVCache(parent, 1, 2).update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)


def test_generate_ids_shows_a_progress_bar_over_replies_when_labelled(child, monkeypatch, capsys) -> None:
    """Long generation (eval, rl's held-out checks, sft's toggle check) is not a silent stretch (issue 15 §4)."""
    from types import SimpleNamespace

    from nemoforge.models.generate import generate_ids

    tokenizer = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    prompts = [[5, 6, 7], [8, 9], [10]]
    monkeypatch.delenv("NEMOFORGE_NO_PROGRESS")
    labelled = generate_ids(child, tokenizer, prompts, max_new_tokens=3, batch_size=2, desc="eval: math")
    err = capsys.readouterr().err
    assert "eval: math:" in err and "/3 [" in err and "reply/s" in err
    assert generate_ids(child, tokenizer, prompts, max_new_tokens=3, batch_size=2) == labelled
    assert capsys.readouterr().err == ""  # no label, no bar
    monkeypatch.setenv("NEMOFORGE_NO_PROGRESS", "1")
    generate_ids(child, tokenizer, prompts, max_new_tokens=3, batch_size=2, desc="eval: math")
    assert capsys.readouterr().err == ""
