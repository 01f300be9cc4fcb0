"""Held-out evaluation: next-token cross-entropy / perplexity of a model, and its KL to a teacher.

Shape legend: ``N`` held-out rows, ``B`` rows per forward, ``T`` tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import math

import torch

from nemoforge.training.losses import causal_lm_loss_BT, kl_div_BT


@torch.no_grad()
def evaluate_heldout(
    model: torch.nn.Module,
    heldout_ids_NT: torch.Tensor,
    *,
    batch_size: int,
    teacher: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Score ``model`` on held-out rows, one forward per ``batch_size`` rows (bf16 autocast on CUDA).

    Args:
        model: the causal LM scored (put in eval mode, then back in its previous mode).
        heldout_ids_NT: LongTensor rows.
        batch_size: rows per forward.
        teacher: when given, also ``kl_div_heldout`` = mean per-token KL(p_teacher || q_model) at temperature 1.

    Returns:
        ``{"loss_heldout": mean next-token cross-entropy (nats/token), "perplexity_heldout": exp of it}``
        plus ``"kl_div_heldout"`` (nats/token) when ``teacher`` is given.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ce_sum, ce_count, kl_sum, kl_count = 0.0, 0, 0.0, 0
    for start in range(0, heldout_ids_NT.shape[0], batch_size):
        input_ids_BT = heldout_ids_NT[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits_BTV = model(input_ids_BT, use_cache=False).logits
            ce_BT = causal_lm_loss_BT(logits_BTV, input_ids_BT)
            ce_sum, ce_count = ce_sum + ce_BT.sum().item(), ce_count + ce_BT.numel()
            if teacher is not None:
                kl_BT = kl_div_BT(teacher(input_ids_BT, use_cache=False).logits, logits_BTV)
                kl_sum, kl_count = kl_sum + kl_BT.sum().item(), kl_count + kl_BT.numel()
    model.train(was_training)
    loss = ce_sum / ce_count
    metrics = {"loss_heldout": loss, "perplexity_heldout": math.exp(loss)}
    if teacher is not None:
        metrics["kl_div_heldout"] = kl_sum / kl_count
    return metrics
