"""Per-variant cost: latency measured on this machine, parameter bytes, KV-cache bytes (Puzzle §4.1, App. B).

Puzzle measures each block variant on the target hardware at fixed (batch, sequence) profiles and predicts a
child's cost as the sum of its blocks' (§4.1; the Llama-8B child's throughput was the sum of block runtimes).
Here every distinct sub-block shape is timed once (a layer's cost does not depend on its position), as L blocks
of that shape, one per layer and each with its own weights, run one after another (the time divided by L):

- parent attention (RMSNorm + GQA + residual) and each FFN width (RMSNorm + SwiGLU + residual);
- prefill: one forward of ``batch_size x prefill_tokens`` tokens;
- decode: one forward of ``batch_size x 1`` token against a KV cache of ``prefill_tokens`` tokens;
- the fixed part outside the layers: embedding, RoPE tables, final norm, LM head on the last position.

A request costs ``prefill_ms + decode_tokens * decode_ms``; the predicted model latency is the fixed part plus
the sum over layers. The whole parent is timed the same way to check that prediction (SmolLM2-135M, batch 1,
128 + 128 tokens, fp32: predicted within 3-6% of measured on 1 EPYC thread and on 2 Xeon cores). Timings are
wall-clock medians of ``repeats`` rounds (``time.perf_counter``) after warm-up, all shapes interleaved per round,
in the model's dtype, on this machine's threads.

Memory per variant: parameter bytes (``weight_bytes`` per parameter) and, for a kept attention, the KV cache of
``batch_size x (prefill_tokens + decode_tokens)`` tokens: ``tokens * 2 (K and V) * kv_heads * head_dim * kv_bytes``.

Shape legend: B batch_size, P prefill_tokens, D hidden_size, K KV heads, Dh head_dim.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import nn

from nemoforge.config import CostConfig
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM, DeciLMMLP
from nemoforge.stages.nas.library import BlockLibrary, Variant

WARMUP_CALLS = 2
# Short calls (a decode step of one sub-block) are repeated until one timing lasts this long.
MIN_TIMED_MS = 5.0


@dataclass(frozen=True)
class Latency:
    """Milliseconds of one prefill (B x P tokens) and of one decode step (B tokens at KV length P)."""

    prefill_ms: float
    decode_ms: float

    def request_ms(self, decode_tokens: int) -> float:
        """One request: the prefill, then ``decode_tokens`` decode steps."""
        return self.prefill_ms + decode_tokens * self.decode_ms

    def __add__(self, other: Latency) -> Latency:
        return Latency(self.prefill_ms + other.prefill_ms, self.decode_ms + other.decode_ms)

    def report(self, decode_tokens: int) -> dict[str, float]:
        """``{"prefill", "decode", "request"}`` in ms, as written to block_library.json."""
        return {
            "prefill": self.prefill_ms,
            "decode": self.decode_ms,
            "request": self.request_ms(decode_tokens),
        }


ZERO = Latency(0.0, 0.0)


@dataclass(frozen=True)
class CostTable:
    """Measured and counted costs of a block library.

    Attributes:
        measurement: the profile: device, threads, batch_size, prefill_tokens, decode_tokens, dtype, repeats.
        attention: latency of the parent attention sub-block.
        ffn: latency per FFN width (the parent's included), keyed by width.
        fixed: latency outside the layers (embedding, final norm, LM head).
        parent_measured: latency of the whole parent model, timed end to end.
        attention_param_bytes: parameter bytes of the attention sub-block (its norm included).
        ffn_param_bytes: parameter bytes per FFN width (its norm included).
        fixed_param_bytes: embedding, final norm, and the LM head when untied.
        attention_kv_bytes: KV-cache bytes of one attention layer at the profile's batch and length.
    """

    measurement: dict
    attention: Latency
    ffn: dict[int, Latency]
    fixed: Latency
    parent_measured: Latency
    attention_param_bytes: int
    ffn_param_bytes: dict[int, int]
    fixed_param_bytes: int
    attention_kv_bytes: int

    @property
    def decode_tokens(self) -> int:
        return self.measurement["decode_tokens"]

    def latency(self, variant: Variant) -> Latency:
        attention = ZERO if variant.attention_no_op else self.attention
        return attention + (self.ffn[variant.ffn_size] if variant.ffn_size else ZERO)

    def param_bytes(self, variant: Variant) -> int:
        attention = 0 if variant.attention_no_op else self.attention_param_bytes
        return attention + (self.ffn_param_bytes[variant.ffn_size] if variant.ffn_size else 0)

    def kv_cache_bytes(self, variant: Variant) -> int:
        return 0 if variant.attention_no_op else self.attention_kv_bytes

    def predicted(self, variants: list[Variant]) -> Latency:
        """Predicted latency of a model with these per-layer variants: fixed + sum over layers."""
        total = self.fixed
        for variant in variants:
            total = total + self.latency(variant)
        return total

    def to_json(self) -> dict:
        data = asdict(self)
        data["ffn"] = {str(k): asdict(v) for k, v in self.ffn.items()}
        data["ffn_param_bytes"] = {str(k): v for k, v in self.ffn_param_bytes.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> CostTable:
        return cls(
            measurement=data["measurement"],
            attention=Latency(**data["attention"]),
            ffn={int(k): Latency(**v) for k, v in data["ffn"].items()},
            fixed=Latency(**data["fixed"]),
            parent_measured=Latency(**data["parent_measured"]),
            attention_param_bytes=data["attention_param_bytes"],
            ffn_param_bytes={int(k): v for k, v in data["ffn_param_bytes"].items()},
            fixed_param_bytes=data["fixed_param_bytes"],
            attention_kv_bytes=data["attention_kv_bytes"],
        )


class FixedLengthKVCache:
    """A KV cache that always holds ``length`` tokens, so one decode step can be timed again and again.

    Implements the part of the cache interface ``DeciLMAttention`` uses: ``update`` writes the new token at
    position ``length`` and returns ``length + 1`` keys and values; ``get_seq_length`` is ``length``.

    Args:
        model: its attention layers get one slot each (by ``self_attn.cache_idx``).
        batch_size: B.
        length: cached tokens P.
    """

    def __init__(self, model: DeciLMForCausalLM, batch_size: int, length: int) -> None:
        dtype = model.get_input_embeddings().weight.dtype
        self.length = length
        self.keys, self.values = [], []
        for layer in model.model.layers:
            if layer.self_attn is not None:
                shape = (
                    batch_size,
                    layer.self_attn.num_key_value_heads,
                    length + 1,
                    layer.self_attn.head_dim,
                )
                self.keys.append(torch.randn(shape, dtype=dtype))
                self.values.append(torch.randn(shape, dtype=dtype))

    def update(
        self, k_BK1Dh: torch.Tensor, v_BK1Dh: torch.Tensor, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[slot][:, :, self.length :] = k_BK1Dh
        self.values[slot][:, :, self.length :] = v_BK1Dh
        return self.keys[slot], self.values[slot]

    def get_seq_length(self, slot: int = 0) -> int:
        return self.length


def median_ms(fns: dict[Hashable, Callable[[], object]], repeats: int) -> dict[Hashable, float]:
    """Median wall time in ms of each ``fn()`` over ``repeats`` rounds, after ``WARMUP_CALLS`` untimed calls.

    Each round times every function once, in turn, so that a slow spell of a shared machine slows one round of
    all measurements instead of all repeats of one (the ratios between shapes are what the MIP uses). A call
    shorter than ``MIN_TIMED_MS`` is run several times per timing (the time divided), so that timer resolution
    and scheduling noise do not dominate.
    """
    calls = {}
    for name, fn in fns.items():
        for _ in range(WARMUP_CALLS):
            fn()
        started = time.perf_counter()
        fn()
        once_ms = (time.perf_counter() - started) * 1e3
        calls[name] = max(1, int(MIN_TIMED_MS / max(once_ms, 1e-3)))
    timings: dict[Hashable, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            timings[name].append((time.perf_counter() - started) * 1e3 / calls[name])
    return {name: statistics.median(t) for name, t in timings.items()}


def device_name() -> str:
    """This machine in words, e.g. ``"AMD EPYC (x86_64), 2 torch threads"``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} ({platform.machine()}), {torch.get_num_threads()} torch threads"


def _num_bytes(modules: list[nn.Module], weight_bytes: int) -> int:
    return weight_bytes * sum(p.numel() for m in modules for p in m.parameters())


@torch.inference_mode()
def measure_costs(model: DeciLMForCausalLM, library: BlockLibrary, cfg: CostConfig) -> CostTable:
    """Time every distinct sub-block shape of the library and the whole parent; count bytes (Puzzle §4.1).

    Args:
        model: the all-parent model (its layers' attention and FFN modules are timed; narrow FFNs are fresh
            modules of the same dtype, one per layer: timing does not depend on weight values).
        library: the block library.
        cfg: ``nas.cost``.
    """
    config = model.config
    dtype = model.get_input_embeddings().weight.dtype
    B, P = cfg.batch_size, cfg.prefill_tokens
    generator = torch.Generator().manual_seed(0)
    prefill_BPD = torch.randn(B, P, config.hidden_size, generator=generator).to(dtype)
    decode_B1D = torch.randn(B, 1, config.hidden_size, generator=generator).to(dtype)
    rope_prefill = model.model.rotary_emb(prefill_BPD, torch.arange(P)[None])
    rope_decode = model.model.rotary_emb(decode_B1D, torch.tensor([[P]]))
    cache = FixedLengthKVCache(model, B, P)
    layers = list(model.model.layers)
    first = layers[0]
    ids_BP = torch.randint(config.vocab_size, (B, P), generator=generator)
    ids_B1 = ids_BP[:, -1:]

    # Each sub-block shape runs as L blocks, one per layer with its own weights (see _all_layers).
    attention = [partial(layer.attention_block, position_embeddings=rope_prefill) for layer in layers]
    attention_decode = [
        partial(layer.attention_block, position_embeddings=rope_decode, past_key_values=cache)
        for layer in layers
    ]
    fns = {
        ("attention", "prefill"): _all_layers(attention, prefill_BPD),
        ("attention", "decode"): _all_layers(attention_decode, decode_B1D),
        ("fixed", "prefill"): partial(_outside_layers, model, ids_BP, 0),
        ("fixed", "decode"): partial(_outside_layers, model, ids_B1, P),
        ("parent", "prefill"): partial(model, ids_BP, use_cache=False, logits_to_keep=1),
        ("parent", "decode"): partial(model, ids_B1, past_key_values=cache, use_cache=True, logits_to_keep=1),
    }
    ffn_param_bytes = {}
    for width in (library.parent_ffn_size, *library.ffn_sizes):
        # Narrow FFNs are fresh modules, one per layer: timing does not depend on the weights' values.
        mlps = [
            layer.mlp if width == library.parent_ffn_size else DeciLMMLP(config, width).to(dtype)
            for layer in layers
        ]
        blocks = [
            _FFNBlock(layer.post_attention_layernorm, mlp) for layer, mlp in zip(layers, mlps, strict=True)
        ]
        fns[width, "prefill"] = _all_layers(blocks, prefill_BPD)
        fns[width, "decode"] = _all_layers(blocks, decode_B1D)
        ffn_param_bytes[width] = _num_bytes([first.post_attention_layernorm, mlps[0]], cfg.weight_bytes)
    ms = median_ms(fns, cfg.repeats)
    per_layer = {key: value / len(layers) for key, value in ms.items() if key[0] not in ("fixed", "parent")}

    fixed_modules = [model.model.embed_tokens, model.model.norm]
    if not config.tie_word_embeddings:
        fixed_modules.append(model.lm_head)
    kv_tokens = B * (P + cfg.decode_tokens)
    return CostTable(
        measurement={
            "device": device_name(),
            "torch": torch.__version__,
            "batch_size": B,
            "prefill_tokens": P,
            "decode_tokens": cfg.decode_tokens,
            "sequence_length": P + cfg.decode_tokens,
            "dtype": str(dtype).removeprefix("torch."),
            "repeats": cfg.repeats,
            "weight_bytes": cfg.weight_bytes,
            "kv_bytes": cfg.kv_bytes,
        },
        attention=_latency(per_layer, "attention"),
        ffn={width: _latency(per_layer, width) for width in ffn_param_bytes},
        fixed=_latency(ms, "fixed"),
        parent_measured=_latency(ms, "parent"),
        attention_param_bytes=_num_bytes([first.input_layernorm, first.self_attn], cfg.weight_bytes),
        ffn_param_bytes=ffn_param_bytes,
        fixed_param_bytes=_num_bytes(fixed_modules, cfg.weight_bytes),
        attention_kv_bytes=kv_tokens * 2 * library.num_kv_heads * config.head_dim * cfg.kv_bytes,
    )


def _latency(ms: dict[Hashable, float], name: Hashable) -> Latency:
    return Latency(ms[name, "prefill"], ms[name, "decode"])


class _FFNBlock:
    """A residual FFN sub-block of a given width, as ``DeciLMDecoderLayer.ffn_block`` computes it."""

    def __init__(self, norm: nn.Module, mlp: DeciLMMLP) -> None:
        self.norm, self.mlp = norm, mlp

    def __call__(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        return hidden_BTD + self.mlp(self.norm(hidden_BTD))


def _all_layers(
    blocks: list[Callable[[torch.Tensor], torch.Tensor]], x_BTD: torch.Tensor
) -> Callable[[], None]:
    """A call that runs every block once on ``x_BTD``; its time divided by ``len(blocks)`` is one layer's.

    The blocks stand for the model's layers, each with its own weights, so the timing sees the memory traffic
    of a real forward: timing one block again and again would keep its weights in the CPU cache and
    underestimate the memory-bound decode step (by ~40% for SmolLM2-135M on a 2-core EPYC).
    """

    def run_all() -> None:
        for block in blocks:
            block(x_BTD)

    return run_all


def _outside_layers(model: DeciLMForCausalLM, ids_BT: torch.Tensor, past: int) -> torch.Tensor:
    """What a forward does outside its layers: embedding, RoPE tables, final norm, LM head on the last position."""
    hidden_BTD = model.model.embed_tokens(ids_BT)
    model.model.rotary_emb(hidden_BTD, torch.arange(past, past + ids_BT.shape[1])[None])
    return model.lm_head(model.model.norm(hidden_BTD)[:, -1:])
