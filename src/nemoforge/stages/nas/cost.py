"""Per-variant cost: latency measured on the target device, parameter bytes, KV-cache bytes (Puzzle §4.1, App. B).

Puzzle measures each block variant on the target hardware at fixed (batch, sequence) profiles and predicts a
child's cost as the sum of its blocks' (§4.1; the Llama-8B child's throughput was the sum of block runtimes).
Here every distinct sub-block shape is timed once (a layer's cost does not depend on its position), as L blocks
of that shape, one per layer and each with its own weights, run one after another (the time divided by L):

- parent attention (RMSNorm + GQA + residual) and each FFN width (RMSNorm + SwiGLU + residual);
- prefill: one forward of ``batch_size x prefill_tokens`` tokens;
- decode: one step of ``batch_size x 1`` token, as ``nemoforge.models.generate.generate`` runs it on the device:
  ``"eager"`` (CPU): against a KV cache of ``prefill_tokens`` tokens; ``"fixed_shape"`` (CUDA): the fixed-shape
  step, attending over all ``prefill_tokens + decode_tokens`` slots of the static cache under a mask, each
  measured call one CUDA-graph replay;
- the fixed part outside the layers: embedding, RoPE tables, final norm, LM head on the last position (and in
  ``"fixed_shape"`` decode, the mask, the step's input copies and the greedy pick, all that a decode step of
  ``generate`` does besides its layers).

A request costs ``prefill_ms + decode_tokens * decode_ms``; the predicted model latency is the fixed part plus
the sum over layers. The whole parent is timed the same way to check that prediction (SmolLM2-135M, batch 1,
128 + 128 tokens, fp32: predicted within 3-6% of measured on 1 EPYC thread and on 2 Xeon cores). Timings are
medians of ``repeats`` rounds after warm-up, all shapes interleaved per round, in the model's dtype: on the CPU
wall-clock (``time.perf_counter``, this machine's threads), on CUDA between CUDA events on the current stream.

Memory per variant: parameter bytes (``weight_bytes`` per parameter) and, for a kept attention, the KV cache of
``batch_size x (prefill_tokens + decode_tokens)`` tokens: ``tokens * 2 (K and V) * kv_heads * head_dim * kv_bytes``
(what ``StaticKVCache`` allocates for such a request when ``kv_bytes`` is the dtype's size).

Shape legend: B batch_size, P prefill_tokens, N decode_tokens, S = P + N cache slots, D hidden_size,
K KV heads, Dh head_dim.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from nemoforge.models.generate import FixedShapeDecodeStep, StaticKVCache, capture_cuda_graph
from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM, DeciLMMLP
from nemoforge.stages.nas.library import BlockLibrary, Variant

if TYPE_CHECKING:
    from nemoforge.config import CostConfig
    from nemoforge.models.hf.configuration_decilm import DeciLMConfig

WARMUP_CALLS = 2
# Short calls (a decode step of one sub-block) are repeated until one timing lasts this long.
MIN_TIMED_MS = 5.0
DECODE_MODES = ("eager", "fixed_shape")

Timer = Callable[[Callable[[], object], int], float]
"""``timer(fn, calls)``: milliseconds per call of ``fn`` run ``calls`` times back to back."""


@dataclass(frozen=True)
class Latency:
    """Milliseconds of one prefill (B x P tokens) and of one decode step (B tokens; see the module docstring)."""

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
        measurement: the profile: device, torch, dtype, timer, decode mode and the KV tokens a decode step
            attends, batch_size, prefill_tokens, decode_tokens, repeats, weight_bytes, kv_bytes.
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

    def ffn_line(self) -> tuple[Latency, Latency]:
        """The least-squares line ``a + b * width`` through the measured FFN widths, prefill and decode fitted
        apart: ``(a, b)``, ``b`` in ms per channel.

        The intercept ``a`` is the per-layer cost independent of width (norm, residual, kernel launches): what
        FFN Fusion saves per FFN it merges into another (:meth:`fusion_saving`).

        Raises:
            ValueError: the table has fewer than two widths to fit a line through.
        """
        if len(self.ffn) < 2:
            raise ValueError(f"{len(self.ffn)} measured FFN width(s) cannot fit a line")
        widths = list(self.ffn)
        mean_w = sum(widths) / len(widths)
        var_w = sum((w - mean_w) ** 2 for w in widths)

        def fit(values: list[float]) -> tuple[float, float]:
            mean_v = sum(values) / len(values)
            slope = sum((w - mean_w) * (v - mean_v) for w, v in zip(widths, values, strict=True)) / var_w
            return mean_v - slope * mean_w, slope

        a_prefill, b_prefill = fit([self.ffn[w].prefill_ms for w in widths])
        a_decode, b_decode = fit([self.ffn[w].decode_ms for w in widths])
        return Latency(a_prefill, a_decode), Latency(b_prefill, b_decode)

    def ffn_latency(self, width: int) -> Latency:
        """Latency of an FFN sub-block of ``width`` channels: measured when the table has the width, else on
        :meth:`ffn_line` (widths outside the library come from FFN Fusion: a run's summed width).

        Raises:
            ValueError: the width was not measured and the table cannot fit a line.
        """
        if width in self.ffn:
            return self.ffn[width]
        a, b = self.ffn_line()
        return Latency(a.prefill_ms + b.prefill_ms * width, a.decode_ms + b.decode_ms * width)

    def fusion_saving(self) -> Latency:
        """What the cost model predicts FFN Fusion saves per FFN merged into another of its run: the intercept of
        :meth:`ffn_line`. Fusing k FFNs of widths ``w_i`` into one of width ``W = sum w_i`` is predicted at
        ``a + b * W`` (W not measured) against ``sum_i latency(w_i)``, a saving of ``(k - 1) * a`` up to the
        line's residuals at the ``w_i``; exact when the measured widths lie on the line. Negative when the
        timings put the line below the origin (then the model predicts fusion costs time)."""
        return self.ffn_line()[0]

    def predicted_config(self, config: DeciLMConfig) -> Latency:
        """Predicted latency of any model of the library's parent: fixed + per layer its attention (the parent's,
        the only kept attention in the library) and its FFN by :meth:`ffn_latency` (e.g. an FFN-fused child)."""
        total = self.fixed
        for i in range(config.num_hidden_layers):
            if not config.block_configs[i].attention.no_op:
                total = total + self.attention
            width = config.intermediate_size_of(i)
            if width:
                total = total + self.ffn_latency(width)
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
        param = model.get_input_embeddings().weight
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
                self.keys.append(torch.randn(shape, dtype=param.dtype, device=param.device))
                self.values.append(torch.randn(shape, dtype=param.dtype, device=param.device))

    def update(
        self, k_BK1Dh: torch.Tensor, v_BK1Dh: torch.Tensor, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[slot][:, :, self.length :] = k_BK1Dh
        self.values[slot][:, :, self.length :] = v_BK1Dh
        return self.keys[slot], self.values[slot]

    def get_seq_length(self, slot: int = 0) -> int:
        return self.length


def wall_clock_ms(fn: Callable[[], object], calls: int) -> float:
    """Milliseconds per call of ``fn`` run ``calls`` times, by the host's wall clock (synchronous CPU work)."""
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) * 1e3 / calls


def cuda_event_ms(fn: Callable[[], object], calls: int) -> float:
    """Milliseconds per call of ``fn`` run ``calls`` times, between two CUDA events on the current stream.

    The GPU's own clock: the time from the start event to the end event as the stream executes them, so host-side
    launch gaps count only where they leave the GPU idle (as they would in the real run). Waits for the end event.
    """
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def median_ms(
    fns: dict[Hashable, Callable[[], object]], repeats: int, timer: Timer = wall_clock_ms
) -> dict[Hashable, float]:
    """Median time in ms of each ``fn()`` over ``repeats`` rounds, after ``WARMUP_CALLS`` untimed calls.

    Each round times every function once, in turn, so that a slow spell of a shared machine (or a GPU clock
    change) slows one round of all measurements instead of all repeats of one (the ratios between shapes are what
    the MIP uses). A call shorter than ``MIN_TIMED_MS`` is run several times per timing (the time divided), so
    that timer resolution and scheduling noise do not dominate.

    Args:
        fns: the calls to time, by name.
        repeats: timed rounds.
        timer: ``wall_clock_ms`` (CPU) or ``cuda_event_ms`` (CUDA).
    """
    calls = {}
    for name, fn in fns.items():
        for _ in range(WARMUP_CALLS):
            fn()
        once_ms = timer(fn, 1)
        calls[name] = max(1, int(MIN_TIMED_MS / max(once_ms, 1e-3)))
    timings: dict[Hashable, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            timings[name].append(timer(fn, calls[name]))
    return {name: statistics.median(t) for name, t in timings.items()}


def device_name(device: torch.device | None = None) -> str:
    """The timing device in words: ``"NVIDIA H200 (CUDA 13.0, sm_90, 132 SMs)"`` for a CUDA device, else this
    machine's CPU, e.g. ``"AMD EPYC (x86_64), 2 torch threads"``."""
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (
            f"{props.name} (CUDA {torch.version.cuda}, sm_{props.major}{props.minor}, "
            f"{props.multi_processor_count} SMs)"
        )
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
def measure_costs(
    model: DeciLMForCausalLM, library: BlockLibrary, cfg: CostConfig, *, decode: str | None = None
) -> CostTable:
    """Time every distinct sub-block shape of the library and the whole parent; count bytes (Puzzle §4.1).

    Runs where the model is: on a CUDA device with CUDA-event timing, elsewhere by the wall clock.

    Args:
        model: the all-parent model (its layers' attention and FFN modules are timed; narrow FFNs are fresh
            modules of the same dtype and device, one per layer: timing does not depend on weight values).
        library: the block library.
        cfg: ``nas.cost``.
        decode: how a decode step runs (module docstring): ``"fixed_shape"`` as ``generate`` on CUDA (replayed as
            a CUDA graph there; eager on the CPU, which only tests use), ``"eager"`` as ``generate`` on the CPU.
            Default: what ``generate`` does on the model's device.

    Raises:
        ValueError: an unknown ``decode`` mode.
    """
    config = model.config
    param = model.get_input_embeddings().weight
    dtype, device = param.dtype, param.device
    on_cuda = device.type == "cuda"
    decode = decode or ("fixed_shape" if on_cuda else "eager")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: expected one of {DECODE_MODES}")
    B, P, N = cfg.batch_size, cfg.prefill_tokens, cfg.decode_tokens
    generator = torch.Generator(device).manual_seed(0)
    prefill_BPD = torch.randn(B, P, config.hidden_size, generator=generator, device=device).to(dtype)
    decode_B1D = torch.randn(B, 1, config.hidden_size, generator=generator, device=device).to(dtype)
    rope_prefill = model.model.rotary_emb(prefill_BPD, torch.arange(P, device=device)[None])
    layers = list(model.model.layers)
    first = layers[0]
    ids_BP = torch.randint(config.vocab_size, (B, P), generator=generator, device=device)
    ids_B1 = ids_BP[:, -1:]

    # Each sub-block shape runs as L blocks, one per layer with its own weights (see _all_layers).
    attention = [partial(layer.attention_block, position_embeddings=rope_prefill) for layer in layers]
    fns = {
        ("attention", "prefill"): _all_layers(attention, prefill_BPD),
        ("fixed", "prefill"): partial(_outside_layers, model, ids_BP, 0),
        ("parent", "prefill"): partial(model, ids_BP, use_cache=False, logits_to_keep=1),
    }
    ffn_blocks, ffn_param_bytes = {}, {}
    for width in (library.parent_ffn_size, *library.ffn_sizes):
        with torch.device(device):
            mlps = [
                layer.mlp if width == library.parent_ffn_size else DeciLMMLP(config, width).to(dtype)
                for layer in layers
            ]
        ffn_blocks[width] = [
            _FFNBlock(layer.post_attention_layernorm, mlp) for layer, mlp in zip(layers, mlps, strict=True)
        ]
        fns[width, "prefill"] = _all_layers(ffn_blocks[width], prefill_BPD)
        ffn_param_bytes[width] = _num_bytes([first.post_attention_layernorm, mlps[0]], cfg.weight_bytes)
    if decode == "eager":
        fns.update(_eager_decode_fns(model, ffn_blocks, decode_B1D, ids_B1, P))
        decode_kv_tokens = P
    else:
        fns.update(
            _fixed_shape_decode_fns(
                model, ffn_blocks, decode_B1D, ids_B1, P, N, cuda_graph=on_cuda, generator=generator
            )
        )
        decode_kv_tokens = P + N
    ms = median_ms(fns, cfg.repeats, cuda_event_ms if on_cuda else wall_clock_ms)
    per_layer = {key: value / len(layers) for key, value in ms.items() if key[0] not in ("fixed", "parent")}

    fixed_modules = [model.model.embed_tokens, model.model.norm]
    if not config.tie_word_embeddings:
        fixed_modules.append(model.lm_head)
    kv_tokens = B * (P + N)
    return CostTable(
        measurement={
            "device": device_name(device),
            "torch": torch.__version__,
            "batch_size": B,
            "prefill_tokens": P,
            "decode_tokens": N,
            "sequence_length": P + N,
            "dtype": str(dtype).removeprefix("torch."),
            "timer": "cuda_event" if on_cuda else "perf_counter",
            "decode": "cuda_graph" if decode == "fixed_shape" and on_cuda else decode,
            "decode_kv_tokens": decode_kv_tokens,
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


def _eager_decode_fns(
    model: DeciLMForCausalLM,
    ffn_blocks: dict[int, list[_FFNBlock]],
    decode_B1D: torch.Tensor,
    ids_B1: torch.Tensor,
    P: int,
) -> dict[Hashable, Callable[[], object]]:
    """Decode calls as ``generate`` runs them without CUDA graphs: a growing cache, here held at P tokens."""
    B = decode_B1D.shape[0]
    cache = FixedLengthKVCache(model, B, P)
    rope_decode = model.model.rotary_emb(decode_B1D, torch.tensor([[P]], device=decode_B1D.device))
    attention = [
        partial(layer.attention_block, position_embeddings=rope_decode, past_key_values=cache)
        for layer in model.model.layers
    ]
    fns = {
        ("attention", "decode"): _all_layers(attention, decode_B1D),
        ("fixed", "decode"): partial(_outside_layers, model, ids_B1, P),
        ("parent", "decode"): partial(model, ids_B1, past_key_values=cache, use_cache=True, logits_to_keep=1),
    }
    for width, blocks in ffn_blocks.items():
        fns[width, "decode"] = _all_layers(blocks, decode_B1D)
    return fns


def _fixed_shape_decode_fns(
    model: DeciLMForCausalLM,
    ffn_blocks: dict[int, list[_FFNBlock]],
    decode_B1D: torch.Tensor,
    ids_B1: torch.Tensor,
    P: int,
    N: int,
    *,
    cuda_graph: bool,
    generator: torch.Generator,
) -> dict[Hashable, Callable[[], object]]:
    """Decode calls as ``generate`` runs them on CUDA: ``FixedShapeDecodeStep`` over S = P + N cache slots.

    The parent is timed as the real step plus the greedy pick; the fixed part as the same step of the model with
    its layers taken out; each sub-block shape as its L blocks on the step's mask, RoPE and cache. With
    ``cuda_graph`` every call is one graph replay, as in ``generate``.
    """
    B, device = decode_B1D.shape[0], decode_B1D.device
    S = P + N
    token_B = ids_B1[:, 0]
    position_B1 = torch.full((B, 1), P, dtype=torch.long, device=device)
    pad_mask_BS = torch.ones(B, S, dtype=torch.bool, device=device)
    cache = StaticKVCache(model, B, S)
    # The prompt's slots hold values, as after a prefill (zeros can run faster than real data).
    for kv_BKSDh in cache.keys + cache.values:
        kv_BKSDh[:, :, :P].normal_(generator=generator)
    parent_step = FixedShapeDecodeStep(model, cache, pad_mask_BS, P, cuda_graph=cuda_graph)
    with _without_layers(model):
        fixed_step = FixedShapeDecodeStep(
            model, StaticKVCache(model, B, S), pad_mask_BS, P, cuda_graph=cuda_graph
        )

    def fixed() -> torch.Tensor:
        with _without_layers(model):  # only an eager step reads the layers again
            return _greedy_step(fixed_step, token_B, position_B1, P)

    # The sub-blocks see what the step's layers see: its mask, RoPE at position P and cache slots (write slot P).
    mask_B11S = parent_step.attention_mask()
    rope_decode = model.model.rotary_emb(decode_B1D, position_B1)
    attention = [
        partial(
            layer.attention_block,
            position_embeddings=rope_decode,
            attention_mask=mask_B11S,
            past_key_values=cache,
        )
        for layer in model.model.layers
    ]
    fns = {
        ("attention", "decode"): _replayed(_all_layers(attention, decode_B1D), cuda_graph, device),
        ("fixed", "decode"): fixed,
        ("parent", "decode"): partial(_greedy_step, parent_step, token_B, position_B1, P),
    }
    for width, blocks in ffn_blocks.items():
        fns[width, "decode"] = _replayed(_all_layers(blocks, decode_B1D), cuda_graph, device)
    return fns


def _greedy_step(
    step: FixedShapeDecodeStep, token_B: torch.Tensor, position_B1: torch.Tensor, write_pos: int
) -> torch.Tensor:
    """One decode step as ``generate``'s greedy loop runs it: the step, the next positions, the argmax (B,)."""
    logits_BV = step(token_B, position_B1, write_pos)
    _next_position_B1 = position_B1 + 1
    return logits_BV.argmax(-1)


def _replayed(fn: Callable[[], object], cuda_graph: bool, device: torch.device) -> Callable[[], object]:
    """``fn`` itself, or with ``cuda_graph`` the replay of its CUDA graph (captured here)."""
    if not cuda_graph:
        return fn
    graph, _ = capture_cuda_graph(fn, device)
    return graph.replay


@contextmanager
def _without_layers(model: DeciLMForCausalLM) -> Iterator[None]:
    """The model with no decoder layers for the duration: a forward is then only its fixed part."""
    layers = model.model.layers
    model.model.layers = nn.ModuleList()
    try:
        yield
    finally:
        model.model.layers = layers


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
    model.model.rotary_emb(hidden_BTD, torch.arange(past, past + ids_BT.shape[1], device=ids_BT.device)[None])
    return model.lm_head(model.model.norm(hidden_BTD)[:, -1:])
