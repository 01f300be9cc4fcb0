"""GRPO and DPO losses on plain tensors.

Shape legend: ``N`` sequences (``P`` prompts x ``G`` generations, grouped contiguously), ``T`` tokens,
``V`` vocabulary. Log-probabilities are per token of the sequence, ``logp_NT[:, t]`` = log p(token t+1 | ≤ t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_advantages(
    rewards_N: torch.Tensor, group_size: int, *, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO outcome advantages: each reward minus its group's mean, over the group's std (DeepSeekMath §4.1.2).

    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` with the unbiased std, as TRL's
    ``scale_rewards="group"``. Unscorable rows (reward NaN) are left out of their group's mean and std and
    get ``A = 0``, so their policy term carries no gradient. A group with fewer than two scorable rows, or
    whose scorable rewards are all equal (std 0, ``torch.isclose`` as TRL), gives no signal: all zeros.

    Args:
        rewards_N: one reward per sequence (NaN: unscorable), groups of ``group_size`` contiguous.
        group_size: ``G``.
        eps: keeps the division finite.

    Returns:
        ``(advantages_N, zero_std_P)``: ``zero_std_P`` marks the groups that give no signal (their mean is
        TRL's ``frac_reward_zero_std``).
    """
    r_PG = rewards_N.view(-1, group_size).float()
    scored_PG = ~r_PG.isnan()
    num_scored_P1 = scored_PG.sum(1, keepdim=True)
    mean_P1 = torch.where(scored_PG, r_PG, 0.0).sum(1, keepdim=True) / num_scored_P1.clamp(min=1)
    centered_PG = torch.where(scored_PG, r_PG - mean_P1, 0.0)
    std_P1 = (centered_PG.square().sum(1, keepdim=True) / (num_scored_P1 - 1).clamp(min=1)).sqrt()
    zero_std_P1 = (num_scored_P1 < 2) | torch.isclose(std_P1, torch.zeros_like(std_P1))
    advantages_PG = torch.where(zero_std_P1, 0.0, centered_PG / (std_P1 + eps))
    return advantages_PG.view(-1), zero_std_P1.view(-1)


def token_logps(
    model: torch.nn.Module,
    input_ids_NT: torch.Tensor,
    attention_mask_NT: torch.Tensor,
    *,
    num_last: int | None = None,
) -> torch.Tensor:
    """``logp_NK``: log-probability under ``model`` (float32) of each of the last ``K`` tokens given the ones before.

    ``K = num_last`` (default ``T - 1``: every next token). Only those ``K`` positions' logits are computed
    (``logits_to_keep``, as TRL does): on a small model the LM head over the vocabulary (49,152 for SmolLM2) is a
    large share of a GRPO step, and only completion tokens need it.

    Raises:
        ValueError: ``num_last`` outside ``[1, T - 1]``.
    """
    num_last = input_ids_NT.shape[1] - 1 if num_last is None else num_last
    if not 1 <= num_last < input_ids_NT.shape[1]:
        raise ValueError(f"num_last must be in [1, {input_ids_NT.shape[1] - 1}], got {num_last}")
    position_ids_NT = (attention_mask_NT.long().cumsum(-1) - 1).clamp(min=0)
    logits_NKV = model(
        input_ids_NT, attention_mask=attention_mask_NT, position_ids=position_ids_NT, use_cache=False,
        logits_to_keep=num_last + 1,
    ).logits[:, :-1].float()
    return torch.gather(logits_NKV.log_softmax(-1), 2, input_ids_NT[:, -num_last:, None]).squeeze(-1)


def clipped_policy_loss(
    logp_NT: torch.Tensor,
    old_logp_NT: torch.Tensor,
    advantages_N: torch.Tensor,
    mask_NT: torch.Tensor,
    *,
    epsilon: float,
    epsilon_high: float | None = None,
    ref_logp_NT: torch.Tensor | None = None,
    beta: float = 0.0,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's clipped surrogate with an optional k3 KL to the reference (DeepSeekMath eq. 3-4, arXiv 2402.03300).

    Per completion token: ``-min(ρ A, clip(ρ, 1-ε, 1+ε_high) A) + β (exp(ref - logp) - (ref - logp) - 1)``
    with ``ρ = exp(logp - old_logp)``; averaged over all completion tokens of the batch (token-level, as
    DAPO and LN's Megatron training), not per sequence first.

    The k3 KL term applies to every completion token, whatever its sequence's advantage, as in
    DeepSeekMath eq. 3 and TRL: sequences of zero-variance groups and unscorable rows (``A = 0``) add no
    policy-gradient term but are still pulled toward the reference by ``β ∇k3``, and they count in the
    token mean. So a batch whose groups all have zero variance still moves the policy when ``β > 0`` and
    it differs from the reference.

    Args:
        logp_NT: current policy log-probs (with grad).
        old_logp_NT: log-probs of the policy that sampled the batch (no grad).
        advantages_N: one advantage per sequence.
        mask_NT: 1 on completion tokens.
        epsilon: low clip range; ``epsilon_high`` the high one (default ``epsilon``).
        ref_logp_NT: reference log-probs, needed when ``beta > 0``.
        beta: KL weight.
        num_tokens: what the token sums are divided by (the loss, ``kl`` and ``clip_fraction``); None: this
            batch's completion tokens. A rank's share of a data-parallel batch passes the global batch's count
            over the ranks, so that the ranks' mean is the global token mean. 0 counts as 1 (no token: loss 0).

    Returns:
        ``(loss, {"clip_fraction", "kl"})``.
    """
    mask = mask_NT.to(logp_NT.dtype)
    count = mask.sum().clamp(min=1) if num_tokens is None else mask.new_tensor(num_tokens or 1.0)
    ratio_NT = torch.exp(logp_NT - old_logp_NT)
    adv_N1 = advantages_N[:, None].to(logp_NT.dtype)
    high = epsilon if epsilon_high is None else epsilon_high
    clipped_NT = torch.clamp(ratio_NT, 1 - epsilon, 1 + high)
    per_token_NT = -torch.min(ratio_NT * adv_N1, clipped_NT * adv_N1)
    kl = torch.zeros((), dtype=logp_NT.dtype, device=logp_NT.device)
    if beta > 0:
        if ref_logp_NT is None:
            raise ValueError("beta > 0 needs ref_logp_NT")
        delta_NT = ref_logp_NT - logp_NT
        kl_NT = torch.exp(delta_NT) - delta_NT - 1
        per_token_NT = per_token_NT + beta * kl_NT
        kl = (kl_NT * mask).sum() / count
    loss = (per_token_NT * mask).sum() / count
    clip_fraction = (((ratio_NT - clipped_NT).abs() > 0).to(mask.dtype) * mask).sum() / count
    return loss, {"clip_fraction": clip_fraction.item(), "kl": kl.item()}


def dpo_loss(
    policy_chosen_logps_B: torch.Tensor,
    policy_rejected_logps_B: torch.Tensor,
    ref_chosen_logps_B: torch.Tensor,
    ref_rejected_logps_B: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO loss on summed response log-probs (Rafailov et al. 2023, arXiv 2305.18290, eq. 7).

    ``-log σ(β [(π_c - ref_c) - (π_r - ref_r)])``, averaged over the batch.

    Returns:
        ``(loss, {"reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin"})`` where the
        implicit rewards are ``β (π - ref)``.
    """
    chosen_B = beta * (policy_chosen_logps_B - ref_chosen_logps_B)
    rejected_B = beta * (policy_rejected_logps_B - ref_rejected_logps_B)
    loss = -F.logsigmoid(chosen_B - rejected_B).mean()
    return loss, {
        "reward_chosen": chosen_B.mean().item(),
        "reward_rejected": rejected_B.mean().item(),
        "reward_accuracy": (chosen_B > rejected_B).float().mean().item(),
        "reward_margin": (chosen_B - rejected_B).mean().item(),
    }
