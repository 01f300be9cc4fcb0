"""Held-out language-model quality: next-token top-1 accuracy and cross-entropy on text no stage trained on.

The text is the corpus stage's held-out split (``heldout.pt`` of the corpus that nas, distill and cpt
read; they train on ``train.pt`` only). Scores are kept per row, the unit of the confidence intervals:
the tokens of one row are not independent draws (:mod:`nemoforge.stats`).

Shape legend: ``N`` held-out rows, ``B`` rows per forward, ``T`` tokens per row, ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemoforge.training.losses import causal_lm_loss_BT


@dataclass(frozen=True)
class NextTokenScores:
    """Per-row next-token scores of one model (position ``t`` predicts token ``t + 1``).

    Attributes:
        correct_N: tokens whose argmax prediction is right, per row.
        ce_sum_N: summed cross-entropy per row (nats).
        tokens_N: predicted tokens per row (``T - 1``).
    """

    correct_N: list[int]
    ce_sum_N: list[float]
    tokens_N: list[int]

    @property
    def top1(self) -> float:
        """Next-token top-1 accuracy over all tokens, in [0, 1]."""
        return sum(self.correct_N) / sum(self.tokens_N)

    @property
    def loss(self) -> float:
        """Mean next-token cross-entropy (nats/token)."""
        return sum(self.ce_sum_N) / sum(self.tokens_N)


@torch.no_grad()
def next_token_scores(model: torch.nn.Module, heldout_ids_NT: torch.Tensor, *, batch_size: int) -> NextTokenScores:
    """Score ``model`` on packed held-out rows (no padding), ``batch_size`` rows per forward.

    Args:
        model: a causal LM in eval mode.
        heldout_ids_NT: LongTensor ``(N, T)`` with ``T >= 2``.
        batch_size: rows per forward ``B``.

    Returns:
        Per-row top-1 hits, summed CE (float32 softmax) and token counts.
    """
    device = next(model.parameters()).device
    correct, ce_sum, tokens = [], [], []
    for start in range(0, heldout_ids_NT.shape[0], batch_size):
        ids_BT = heldout_ids_NT[start : start + batch_size].to(device)
        logits_BTV = model(ids_BT, use_cache=False).logits
        ce_BT = causal_lm_loss_BT(logits_BTV, ids_BT)
        hits_BT = logits_BTV[:, :-1].argmax(dim=-1) == ids_BT[:, 1:]
        correct += hits_BT.sum(dim=1).tolist()
        ce_sum += ce_BT.sum(dim=1).tolist()
        tokens += [ce_BT.shape[1]] * ids_BT.shape[0]
    return NextTokenScores(correct, ce_sum, tokens)
