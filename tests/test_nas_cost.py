"""Cost table of the block library (Puzzle §4.1): measured latencies, parameter and KV-cache bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nemoforge.config import CostConfig, NASConfig
from nemoforge.models.block_configs import count_params, kv_cache_bytes_per_token
from nemoforge.models.convert import child_from_parent, load_causal_lm
from nemoforge.models.generate import StaticKVCache
from nemoforge.stages.nas.cost import CostTable, FixedLengthKVCache, Latency, measure_costs
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
    ids = torch.randint(0, 4000, (2, 17), generator=torch.Generator().manual_seed(0))
    real = StaticKVCache(parent, 2, 17)
    parent(ids[:, :16], past_key_values=real, use_cache=True)
    expected = parent(ids[:, 16:], past_key_values=real, use_cache=True).logits
    fixed = FixedLengthKVCache(parent, 2, 16)
    for slot in range(len(fixed.keys)):
        fixed.keys[slot][:, :, :16] = real.keys[slot][:, :, :16]
        fixed.values[slot][:, :, :16] = real.values[slot][:, :, :16]
    got = parent(ids[:, 16:], past_key_values=fixed, use_cache=True).logits
    assert torch.allclose(got, expected, atol=1e-5)
