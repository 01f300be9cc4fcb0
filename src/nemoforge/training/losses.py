"""Losses of the training stages: global KD (distill) and causal-LM cross-entropy (cpt).

Shape legend: ``B`` batch, ``T`` tokens, ``D`` hidden size, ``V`` vocabulary, ``L`` decoder layers.
Per-token quantities are averaged over all ``B * T`` positions; KL and cross-entropy are in nats.
"""

from __future__ import annotations

import functools
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
        ValueError: the two sequences differ in length (the caller pairs them: Puzzle children replace blocks
            by no-ops and keep the parent's layer count; the distill stage pairs an FFN-fused block with the
            parent's last layer of its run).
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


def _softmax_xent(logits_CV: torch.Tensor, targets_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of one chunk of logits and its gradient ``softmax - onehot`` in the logits' dtype.

    Softmax and loss in float32 (float64 for float64 logits). Written as whole-tensor expressions so that
    ``torch.compile`` fuses them into two passes over the chunk (max/sum, then the gradient).
    """
    dtype, acc = logits_CV.dtype, torch.promote_types(logits_CV.dtype, torch.float32)
    logits_CV = logits_CV.to(acc)
    lse_C = torch.logsumexp(logits_CV, dim=-1)
    loss = (lse_C - logits_CV.gather(1, targets_C[:, None])[:, 0]).sum()
    onehot_CV = torch.arange(logits_CV.shape[1], device=logits_CV.device)[None, :] == targets_C[:, None]
    grad_CV = torch.exp(logits_CV - lse_C[:, None]) - onehot_CV.to(acc)
    return loss, grad_CV.to(dtype)


@functools.cache
def _softmax_xent_compiled():
    return torch.compile(_softmax_xent, dynamic=False)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean CE of ``hidden_ND @ weight_VD^T`` against ``targets_N``, chunked over tokens; grads made in forward.

    Each chunk's logits ``(chunk, V)`` are computed, turned into the loss and into the gradient
    ``softmax - onehot``, then multiplied back into ``grad_hidden`` and ``grad_weight`` and dropped: no
    ``(N, V)`` tensor is ever held, and the backward only scales the stored gradients (the method of Liger
    Kernel's fused linear cross-entropy, arXiv 2410.10989 §3.3). The matmuls run in the inputs' dtype; the
    softmax, the loss and the ``grad_weight`` accumulation in float32; ``compiled`` fuses the softmax part.
    """

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, chunk_tokens, compiled):
        N = hidden_ND.shape[0]
        acc = torch.promote_types(hidden_ND.dtype, torch.float32)  # float32, or float64 for float64 inputs
        loss_sum = hidden_ND.new_zeros((), dtype=acc)
        grad_hidden_ND = torch.empty_like(hidden_ND)
        grad_weight_VD = torch.zeros(weight_VD.shape, dtype=acc, device=weight_VD.device)
        for start in range(0, N, chunk_tokens):
            h_CD = hidden_ND[start : start + chunk_tokens]
            t_C = targets_N[start : start + chunk_tokens]
            xent = _softmax_xent_compiled() if compiled else _softmax_xent
            loss_C, grad_logits_CV = xent(h_CD @ weight_VD.T, t_C)
            loss_sum += loss_C
            grad_hidden_ND[start : start + chunk_tokens] = grad_logits_CV @ weight_VD
            grad_weight_VD += (grad_logits_CV.T @ h_CD).to(acc)  # bf16 product, as autocast's lm_head grad
        ctx.save_for_backward(grad_hidden_ND, grad_weight_VD)
        ctx.weight_dtype = weight_VD.dtype
        ctx.num_tokens = N
        return loss_sum / N

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden_ND, grad_weight_VD = ctx.saved_tensors
        scale = grad_loss / ctx.num_tokens
        return (
            grad_hidden_ND * scale.to(grad_hidden_ND.dtype),
            (grad_weight_VD * scale).to(ctx.weight_dtype),
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    chunk_tokens: int = 4096,
    compiled: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy (nats) of the logits ``hidden_ND @ weight_VD^T`` against ``targets_N``, never holding them.

    Equal to ``F.cross_entropy(hidden_ND @ weight_VD.T, targets_N)`` (float32 softmax), with its gradients, but
    the ``(N, V)`` logits exist one chunk of ``chunk_tokens`` rows at a time (see :class:`_LinearCrossEntropy`).
    Under CUDA autocast the matmuls run in bf16 as an autocast ``lm_head`` would. Every target counts (no
    ignore index).

    Args:
        hidden_ND: final-normed hidden states, ``N`` tokens.
        weight_VD: the LM head's weight.
        targets_N: LongTensor next-token ids.
        chunk_tokens: rows per chunk (memory: ``chunk_tokens * V`` float32 at a time).
        compiled: ``torch.compile`` the per-chunk softmax and gradient into fused kernels (the GPU path; the
            first call compiles).

    Returns:
        The scalar mean loss (float32).
    """
    dtype = hidden_ND.dtype
    if torch.is_autocast_enabled(hidden_ND.device.type):
        dtype = torch.get_autocast_dtype(hidden_ND.device.type)
    with torch.autocast(hidden_ND.device.type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden_ND.to(dtype), weight_VD.to(dtype), targets_N, chunk_tokens, compiled
        )


def causal_lm_loss(model: torch.nn.Module, input_ids_BT: torch.Tensor, *, compiled: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token) of a causal LM on full rows, by :func:`linear_cross_entropy`.

    The same value as ``causal_lm_loss_BT(model(input_ids_BT).logits, input_ids_BT).mean()`` without the
    ``(B, T, V)`` logits: the decoder trunk (``model.base_model``) gives the hidden states, and the LM head's
    weight (``model.get_output_embeddings()``, no bias) is applied chunk by chunk (``compiled``: see
    :func:`linear_cross_entropy`).
    """
    hidden_BTD = model.base_model(input_ids=input_ids_BT, use_cache=False).last_hidden_state
    D = hidden_BTD.shape[-1]
    return linear_cross_entropy(
        hidden_BTD[:, :-1].reshape(-1, D),
        model.get_output_embeddings().weight,
        input_ids_BT[:, 1:].reshape(-1),
        compiled=compiled,
    )
