"""The optimizer and LR schedule every engine trains with: AdamW and linear warmup + cosine decay."""

from __future__ import annotations

import math

import torch

from nemoforge.config import TrainConfig


def lr_multiplier(i: int, *, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR of 0-based update ``i`` as a fraction of the peak: linear warmup, then cosine to ``min_lr_ratio``.

    ``i < W``: ``(i + 1) / W`` (the peak is reached at update ``W - 1``); then with
    ``progress = (i - W + 1) / (S - W)``: ``r + (1 - r) * (1 + cos(pi * progress)) / 2``, which reaches
    exactly ``r = min_lr_ratio`` at the last update ``S - 1``.
    """
    if i < warmup_steps:
        return (i + 1) / warmup_steps
    progress = min(1.0, (i - warmup_steps + 1) / (steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` and its LR schedule (:func:`lr_multiplier` of ``cfg.lr``).

    Group 0: matrices with ``cfg.weight_decay``; group 1: vectors, no decay; fused on CUDA. Every engine
    (single process, DDP, DeepSpeed ZeRO) steps this optimizer, so all apply the same update and write the
    same optimizer state.
    """
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda i: lr_multiplier(
            i, steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio
        ),
    )
    return optimizer, scheduler
