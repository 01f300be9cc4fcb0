"""Losses of the training stages: global KD (distill) and causal-LM cross-entropy (cpt).

Shape legend: ``B`` batch, ``T`` tokens, ``D`` hidden size, ``V`` vocabulary, ``L`` decoder layers.
Per-token quantities are averaged over all ``B * T`` positions; KL and cross-entropy are in nats.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def kl_div_BT(
    parent_logits_BTV: torch.Tensor, child_logits_BTV: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token KL(p_parent || q_child) of the next-token distributions at ``temperature``, in nats.

    Computed in float32 whatever the logits' dtype.

    Returns:
        ``kl_BT``.
    """
    log_p_BTV = F.log_softmax(parent_logits_BTV.float() / temperature, dim=-1)
    log_q_BTV = F.log_softmax(child_logits_BTV.float() / temperature, dim=-1)
    return (log_p_BTV.exp() * (log_p_BTV - log_q_BTV)).sum(dim=-1)


def hidden_cosine_loss(
    child_hidden: Sequence[torch.Tensor], parent_hidden: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``sum_l mean_tokens (1 - cos(h_child^l, h_parent^l))`` over paired hidden states ``hidden_BTD``.

    Raises:
        ValueError: the two sequences differ in length (the child must keep the parent's layer count;
            Puzzle children replace blocks by no-ops instead of removing layers).
    """
    if len(child_hidden) != len(parent_hidden):
        raise ValueError(
            f"child has {len(child_hidden)} hidden states, parent {len(parent_hidden)}: layer counts differ"
        )
    total = child_hidden[0].new_zeros((), dtype=torch.float32)
    for h_child_BTD, h_parent_BTD in zip(child_hidden, parent_hidden, strict=True):
        cos_BT = F.cosine_similarity(h_child_BTD.float(), h_parent_BTD.float(), dim=-1)
        total = total + (1.0 - cos_BT).mean()
    return total


def gkd_loss(
    child_logits_BTV: torch.Tensor,
    parent_logits_BTV: torch.Tensor,
    child_hidden: Sequence[torch.Tensor],
    parent_hidden: Sequence[torch.Tensor],
    *,
    cosine_weight: float,
    kl_weight: float,
    temperature: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Global knowledge distillation loss (Puzzle §4.3 / reference §2.7, arXiv 2411.19146).

    ``cosine_weight * sum_l (1 - cos(h_child^l, h_parent^l)) + kl_weight * T^2 * KL(p_parent || q_child)``,
    each term averaged over tokens. The ``T^2`` factor (Hinton et al., 2015) keeps the KL gradient's scale
    independent of the temperature ``T``; at the default ``T = 1`` the loss is the paper's. No LM loss:
    Puzzle reports that adding it hurts.

    Args:
        child_logits_BTV, parent_logits_BTV: next-token logits.
        child_hidden, parent_hidden: the ``L`` layer outputs ``hidden_BTD`` of each model (HF's
            ``hidden_states[1:]``: every decoder layer's output, the last one after the final norm).
        cosine_weight, kl_weight, temperature: ``recipe.distill``.

    Returns:
        ``(loss, {"loss_cosine": ..., "loss_kl": ...})`` (the parts unweighted, as floats).
    """
    cosine = hidden_cosine_loss(child_hidden, parent_hidden)
    kl = kl_div_BT(parent_logits_BTV, child_logits_BTV, temperature).mean()
    loss = cosine_weight * cosine + kl_weight * temperature**2 * kl
    return loss, {"loss_cosine": cosine.item(), "loss_kl": kl.item()}


def causal_lm_loss_BT(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy in nats, float32; position ``t`` predicts token ``t + 1``.

    Returns:
        ``ce_BT'`` with ``T' = T - 1`` (the last position has no target).
    """
    return F.cross_entropy(logits_BTV[:, :-1].float().transpose(1, 2), input_ids_BT[:, 1:], reduction="none")
