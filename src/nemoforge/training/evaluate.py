"""Held-out evaluation: next-token cross-entropy / perplexity of a model, and its KL to a teacher.

Shape legend: ``N`` held-out rows, ``B`` rows per forward, ``T`` tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import math

import torch

from nemoforge.training.losses import causal_lm_loss_BT, kl_div_BT


@torch.no_grad()
def heldout_row_scores(
    model: torch.nn.Module,
    heldout_ids_NT: torch.Tensor,
    *,
    batch_size: int,
    teacher: torch.nn.Module | None = None,
) -> dict[str, list[float]]:
    """Score ``model`` on each held-out row, one forward per ``batch_size`` rows (bf16 autocast on CUDA).

    Per row, so that two scorings of the same rows (before and after training) can be compared row by row
    (:func:`~nemoforge.stats.paired_mean_difference`).

    Args:
        model: the causal LM scored (put in eval mode, then back in its previous mode).
        heldout_ids_NT: LongTensor rows (packed: every row has ``T - 1`` predicted tokens).
        batch_size: rows per forward.
        teacher: when given, also ``kl_div_heldout``: the per-token KL(p_teacher || q_model) at temperature 1.

    Returns:
        ``{"loss_heldout": [N] mean next-token cross-entropy of each row (nats/token)}`` plus
        ``"kl_div_heldout"`` (``[N]``, nats/token) when ``teacher`` is given.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows: dict[str, list[float]] = {"loss_heldout": []} | ({"kl_div_heldout": []} if teacher is not None else {})
    for start in range(0, heldout_ids_NT.shape[0], batch_size):
        input_ids_BT = heldout_ids_NT[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits_BTV = model(input_ids_BT, use_cache=False).logits
            rows["loss_heldout"] += causal_lm_loss_BT(logits_BTV, input_ids_BT).double().mean(-1).tolist()
            if teacher is not None:
                kl_BT = kl_div_BT(teacher(input_ids_BT, use_cache=False).logits, logits_BTV)
                rows["kl_div_heldout"] += kl_BT.double().mean(-1).tolist()
    model.train(was_training)
    return rows


def heldout_means(rows: dict[str, list[float]]) -> dict[str, float]:
    """Means over the rows of :func:`heldout_row_scores` (per token too: every row has as many tokens).

    Returns:
        ``{"loss_heldout": nats/token, "perplexity_heldout": exp of it}`` plus ``"kl_div_heldout"`` (nats/token)
        when the rows have it.
    """
    means = {name: sum(values) / len(values) for name, values in rows.items()}
    means["perplexity_heldout"] = math.exp(means["loss_heldout"])
    return means


def evaluate_heldout(
    model: torch.nn.Module,
    heldout_ids_NT: torch.Tensor,
    *,
    batch_size: int,
    teacher: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Mean held-out scores of ``model``: :func:`heldout_means` of :func:`heldout_row_scores` (same arguments).

    Returns:
        ``{"loss_heldout": mean next-token cross-entropy (nats/token), "perplexity_heldout": exp of it}``
        plus ``"kl_div_heldout"`` = mean per-token KL(p_teacher || q_model) (nats/token) when ``teacher`` is given.
    """
    return heldout_means(heldout_row_scores(model, heldout_ids_NT, batch_size=batch_size, teacher=teacher))
