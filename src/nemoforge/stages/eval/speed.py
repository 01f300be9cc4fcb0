"""Decode speed of child and parent, timed round-robin so that a busy machine slows both alike.

A model timed once in its own phase measures the machine as much as the model: one demo run timed the
parent at 4.7 tokens/s and later ones at 16.2. Here every model decodes once (warm-up), then ``repeats``
rounds time each model back to back, the order alternating between rounds (ABBA...), so that load drifts
and order effects fall on both. The speedup is the ratio of the median tokens/s, with a paired bootstrap
interval over rounds (:func:`~nemoforge.stats.paired_bootstrap_median_ratio`).

Shape legend: ``T`` prompt tokens, ``N`` new tokens, ``R`` rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nemoforge.models.generate import generate

DECODE_PROMPT = "Count slowly from one to one hundred:"
WARMUP_TOKENS = 4


@dataclass(frozen=True)
class DecodeTiming:
    """Greedy batch-1 decode throughput of one model over the round-robin rounds.

    Attributes:
        tokens_per_s_R: tokens/s of each round, in round order (new tokens / wall seconds of the call).
    """

    tokens_per_s_R: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_s_R)

    @property
    def min(self) -> float:
        return min(self.tokens_per_s_R)

    @property
    def max(self) -> float:
        return max(self.tokens_per_s_R)


def time_decode_round_robin(
    models: Mapping[str, torch.nn.Module], tokenizer: Any, *, num_tokens: int, repeats: int
) -> dict[str, DecodeTiming]:
    """Time greedy batch-1 decoding of ``num_tokens`` new tokens (no EOS stop) of each model, round-robin.

    Args:
        models: the models by label (e.g. ``{"child": ..., "parent": ...}``), on one device.
        tokenizer: encodes the fixed prompt :data:`DECODE_PROMPT`.
        num_tokens: new tokens ``N`` per timed call.
        repeats: rounds ``R``; each round times every model once, the order reversed every other round.

    Returns:
        The timing of each label.
    """
    labels = list(models)
    device = next(models[labels[0]].parameters()).device
    ids_1T = torch.tensor([tokenizer.encode(DECODE_PROMPT, add_special_tokens=False)], device=device)
    for model in models.values():
        generate(model, ids_1T, WARMUP_TOKENS)
    tokens_per_s: dict[str, list[float]] = {label: [] for label in labels}
    for round_index in range(repeats):
        for label in labels if round_index % 2 == 0 else reversed(labels):
            tokens_per_s[label].append(_tokens_per_s(models[label], ids_1T, num_tokens))
    return {label: DecodeTiming(values) for label, values in tokens_per_s.items()}


def _tokens_per_s(model: torch.nn.Module, ids_1T: torch.Tensor, num_tokens: int) -> float:
    if ids_1T.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out_1N = generate(model, ids_1T, num_tokens)
    if ids_1T.device.type == "cuda":
        torch.cuda.synchronize()
    return (out_1N.shape[1] - ids_1T.shape[1]) / (time.perf_counter() - started)


def spread_line(timing: DecodeTiming) -> str:
    """``"median M (min a, max b) over R rounds"`` in tokens/s, for the comparison table and check lines."""
    return f"median {timing.median:.4g} (min {timing.min:.4g}, max {timing.max:.4g}) over {len(timing.tokens_per_s_R)} rounds"
