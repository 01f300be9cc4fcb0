"""Cost table of the block library (Puzzle §4.1): measured latencies, parameter and KV-cache bytes."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from nemoforge.config import CostConfig, NASConfig
from nemoforge.models.block_configs import count_params, kv_cache_bytes_per_token
from nemoforge.models.convert import child_from_parent, decilm_config_from_llama, load_causal_lm
from nemoforge.models.generate import FixedShapeDecodeStep, StaticKVCache
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM
from nemoforge.stages.nas.cost import (
    CostTable,
    FixedLengthKVCache,
    Latency,
    _without_layers,
    measure_costs,
    median_ms,
)
from nemoforge.stages.nas.library import Variant, build_library

CFG = CostConfig(batch_size=2, prefill_tokens=16, decode_tokens=4, repeats=2, weight_bytes=2, kv_bytes=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parent(tiny_llama_dir: Path):
    return load_causal_lm(tiny_llama_dir)


@pytest.fixture(scope="module")
def library(parent):
    return build_library(parent.config, NASConfig(ffn_intermediate_sizes=[512, 256]))


@pytest.fixture(scope="module")
def costs(parent, library) -> CostTable:
    return measure_costs(parent, library, CFG)


def test_every_shape_is_timed(costs: CostTable) -> None:
    assert set(costs.ffn) == {768, 512, 256}
    for latency in (costs.attention, costs.fixed, costs.parent_measured, *costs.ffn.values()):
        assert latency.prefill_ms > 0 and latency.decode_ms > 0
    header = costs.measurement
    assert header["batch_size"] == 2 and header["prefill_tokens"] == 16 and header["decode_tokens"] == 4
    assert header["dtype"] == "float32" and "torch threads" in header["device"]
    assert (
        header["timer"] == "perf_counter" and header["decode"] == "eager" and header["decode_kv_tokens"] == 16
    )
    assert CostTable.from_json(costs.to_json()) == costs


def test_variant_latency_is_the_sum_of_its_sub_blocks(costs: CostTable) -> None:
    assert costs.latency(Variant(True, 0)) == Latency(0.0, 0.0)
    assert costs.latency(Variant(False, 512)) == costs.attention + costs.ffn[512]
    assert costs.latency(Variant(True, 256)) == costs.ffn[256]
    assert Latency(2.0, 0.5).request_ms(4) == 4.0
    predicted = costs.predicted([Variant(False, 768)] * 4)
    assert predicted.prefill_ms == pytest.approx(
        costs.fixed.prefill_ms + 4 * (costs.attention + costs.ffn[768]).prefill_ms
    )
    assert predicted.decode_ms == pytest.approx(
        costs.fixed.decode_ms + 4 * (costs.attention + costs.ffn[768]).decode_ms
    )


def test_bytes_add_up_to_the_child(parent, library, costs: CostTable) -> None:
    chosen = [Variant(False, 768), Variant(True, 512), Variant(False, 0), Variant(True, 0)]
    child = child_from_parent(parent, [library.block_config(v) for v in chosen])
    param_bytes = costs.fixed_param_bytes + sum(costs.param_bytes(v) for v in chosen)
    assert param_bytes == 2 * count_params(child.config)
    kv_bytes = sum(costs.kv_cache_bytes(v) for v in chosen)
    # 2 attention layers x 2 KV heads x head_dim 16 x K and V x 2 bytes, for 2 x (16 + 4) tokens.
    assert kv_bytes == kv_cache_bytes_per_token(child.config, 2) * 2 * (16 + 4) == 2 * 2 * 16 * 2 * 2 * 40


@torch.no_grad()
def test_fixed_length_cache_runs_the_real_decode_step(parent) -> None:
    """The timed decode step computes what a real decode at KV length P computes."""
    ids = torch.randint(0, parent.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    real = StaticKVCache(parent, 2, 17)
    parent(ids[:, :16], past_key_values=real, use_cache=True)
    expected = parent(ids[:, 16:], past_key_values=real, use_cache=True).logits
    fixed = FixedLengthKVCache(parent, 2, 16)
    for slot in range(len(fixed.keys)):
        fixed.keys[slot][:, :, :16] = real.keys[slot][:, :, :16]
        fixed.values[slot][:, :, :16] = real.values[slot][:, :, :16]
    got = parent(ids[:, 16:], past_key_values=fixed, use_cache=True).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_kv_bytes_are_what_the_static_cache_allocates(parent, costs: CostTable) -> None:
    cache = StaticKVCache(parent, 2, 16 + 4)
    allocated = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    # The model is float32 (4 bytes per element); the profile counts kv_bytes=2.
    assert (
        allocated
        == len(cache.keys) * costs.attention_kv_bytes * 4 // CFG.kv_bytes
        == 4 * 2 * 2 * 20 * 2 * 16 * 4
    )


def test_wall_clock_median_measures_real_time() -> None:
    ms = median_ms({"sleep": partial(time.sleep, 0.002)}, repeats=3)["sleep"]
    assert 2.0 <= ms < 10.0


def test_fixed_shape_decode_is_timed_as_generate_runs_it_on_cuda(parent, library, costs: CostTable) -> None:
    """The CUDA path's decode timing without the GPU: fixed-shape steps over P + N slots, eager, wall clock."""
    fixed_shape = measure_costs(parent, library, CFG, decode="fixed_shape")
    header = fixed_shape.measurement
    assert header["decode"] == "fixed_shape" and header["decode_kv_tokens"] == 16 + 4
    assert header["timer"] == "perf_counter"
    assert set(fixed_shape.ffn) == {768, 512, 256}
    for latency in (
        fixed_shape.attention,
        fixed_shape.fixed,
        fixed_shape.parent_measured,
        *fixed_shape.ffn.values(),
    ):
        assert latency.prefill_ms > 0 and latency.decode_ms > 0
    assert fixed_shape.attention_kv_bytes == costs.attention_kv_bytes
    assert len(parent.model.layers) == 4  # the fixed part's timing put the layers back
    with pytest.raises(ValueError, match="decode='graph'"):
        measure_costs(parent, library, CFG, decode="graph")


@torch.no_grad()
def test_fixed_part_is_the_decode_step_without_layers(parent) -> None:
    """What the fixed-shape timing counts as the fixed part: embedding -> final norm -> LM head of the new token."""
    token_B, position_B1 = torch.tensor([5, 7]), torch.full((2, 1), 16)
    pad_mask_BS = torch.ones(2, 20, dtype=torch.bool)
    with _without_layers(parent):
        step = FixedShapeDecodeStep(parent, StaticKVCache(parent, 2, 20), pad_mask_BS, 16, cuda_graph=False)
        logits_BV = step(token_B, position_B1, 16)
    assert len(parent.model.layers) == 4
    expected_BV = parent.lm_head(parent.model.norm(parent.model.embed_tokens(token_B)))
    assert torch.allclose(logits_BV, expected_BV, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_costs_use_events_and_graphs_and_predict_the_parent() -> None:
    llama = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    config = decilm_config_from_llama(llama)
    with torch.device("cuda"):
        model = DeciLMForCausalLM(config).to(torch.bfloat16).eval()
    library = build_library(config, NASConfig(ffn_intermediate_sizes=[2048, 1024]))
    profile = CostConfig(batch_size=8, prefill_tokens=256, decode_tokens=64, repeats=5)
    costs = measure_costs(model, library, profile)
    header = costs.measurement
    assert header["device"].startswith(torch.cuda.get_device_name()) and header["timer"] == "cuda_event"
    assert (
        header["decode"] == "cuda_graph"
        and header["decode_kv_tokens"] == 320
        and header["dtype"] == "bfloat16"
    )
    assert costs.ffn[4096].decode_ms > costs.ffn[1024].decode_ms > 0
    predicted = costs.predicted([library.parent] * 8)
    assert predicted.decode_ms == pytest.approx(costs.parent_measured.decode_ms, rel=0.15)
