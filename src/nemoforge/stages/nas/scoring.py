"""Replace-1-block scoring (Puzzle §4.2 and F.1.4, arXiv 2411.19146).

The score of variant ``v`` at layer ``i`` is a whole-model metric of the parent with exactly layer ``i`` replaced by
``v``: KL(parent || model) of the next-token distributions (Puzzle's best-performing score) and the LM loss, on
held-out sequences. Layers ``0..i-1`` are the parent's, so their output is the parent's hidden state ``h_i``,
cached once by :func:`parent_pass`; only layers ``i..L-1`` are recomputed, which is exact and saves half of the
forward work on average. All variants of one layer are recomputed together as one batch.

Units: KL and LM loss in nats, averaged over tokens (KL over all positions, LM loss over next-token targets).

Shape legend: N sequences, T tokens, D hidden_size, V vocab_size, K replacements scored at one layer,
B = K x N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM, DeciLMMLP
from nemoforge.stages.nas.library import Variant


@dataclass(frozen=True)
class ParentPass:
    """The parent's forward on the held-out sequences, kept for partial recomputation and scoring.

    Attributes:
        input_ids_NT: the sequences.
        hidden_NTD: ``L + 1`` entries; ``hidden_NTD[i]`` is the input of layer ``i`` (the last is pre-final-norm).
        post_attention_NTD: ``L`` entries; layer ``i``'s hidden state after its attention sub-block.
        position_embeddings: RoPE (cos, sin) of positions ``0..T-1``.
        probs_NTV: the parent's next-token distribution p (float32).
        plogp_NT: ``sum_v p log p`` per position (minus the parent's entropy), the constant part of KL(p || q).
        lm_loss: the parent's LM loss (nats per token).
    """

    input_ids_NT: torch.Tensor
    hidden_NTD: list[torch.Tensor]
    post_attention_NTD: list[torch.Tensor]
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    probs_NTV: torch.Tensor
    plogp_NT: torch.Tensor
    lm_loss: float

    def score(self, logits_NTV: torch.Tensor) -> tuple[float, float]:
        """``(KL(parent || model), LM loss)`` of a model's logits on these sequences, nats averaged over tokens.

        With ``log q = z - logsumexp(z)`` and ``sum_v p = 1``: ``KL = sum p log p - (sum p z - logsumexp(z))``, so
        the model's log-probabilities are never materialized (two passes over the (N, T, V) logits).
        """
        logits_NTV = logits_NTV.float()
        lse_NT = torch.logsumexp(logits_NTV, dim=-1)
        kl_NT = self.plogp_NT - ((self.probs_NTV * logits_NTV).sum(-1) - lse_NT)
        target_logits = logits_NTV[:, :-1].gather(-1, self.input_ids_NT[:, 1:].unsqueeze(-1)).squeeze(-1)
        lm_loss = (lse_NT[:, :-1] - target_logits).mean()
        return kl_NT.mean().item(), lm_loss.item()


@torch.no_grad()
def parent_pass(model: DeciLMForCausalLM, input_ids_NT: torch.Tensor) -> ParentPass:
    """Run the parent layer by layer on ``input_ids_NT`` and keep every layer's input and post-attention state."""
    hidden_NTD = model.model.embed_tokens(input_ids_NT)
    position_embeddings = model.model.rotary_emb(hidden_NTD, torch.arange(input_ids_NT.shape[1], device=input_ids_NT.device)[None])
    hidden, post_attention = [hidden_NTD], []
    for layer in model.model.layers:
        post_attention.append(layer.attention_block(hidden[-1], position_embeddings))
        hidden.append(layer.ffn_block(post_attention[-1]))
    logprobs_NTV = F.log_softmax(model.lm_head(model.model.norm(hidden[-1])).float(), dim=-1)
    probs_NTV = logprobs_NTV.exp()
    lm_loss = -logprobs_NTV[:, :-1].gather(-1, input_ids_NT[:, 1:].unsqueeze(-1)).mean().item()
    plogp_NT = (probs_NTV * logprobs_NTV).sum(-1)
    return ParentPass(input_ids_NT, hidden, post_attention, position_embeddings, probs_NTV, plogp_NT, lm_loss)


@torch.no_grad()
def variant_layer_output(
    model: DeciLMForCausalLM,
    parent: ParentPass,
    layer_idx: int,
    variant: Variant,
    narrow_mlps: dict[int, DeciLMMLP],
) -> torch.Tensor:
    """Output (N, T, D) of layer ``layer_idx`` replaced by ``variant``, on the parent's input to that layer.

    A kept attention is the parent's (its output is cached); a narrow FFN is ``narrow_mlps[width]`` behind the
    parent's pre-FFN norm (as trained by BLD); the parent FFN is the parent's.
    """
    layer = model.model.layers[layer_idx]
    post_NTD = (
        parent.hidden_NTD[layer_idx] if variant.attention_no_op else parent.post_attention_NTD[layer_idx]
    )
    if variant.ffn_size == 0:
        return post_NTD
    if variant.ffn_size == layer.mlp.intermediate_size:
        return layer.ffn_block(post_NTD)
    return post_NTD + narrow_mlps[variant.ffn_size](layer.post_attention_layernorm(post_NTD))


@torch.no_grad()
def score_layer(
    model: DeciLMForCausalLM, parent: ParentPass, layer_idx: int, outputs_NTD: Sequence[torch.Tensor]
) -> list[tuple[float, float]]:
    """Replace-1-block scores of several replacements of layer ``layer_idx`` (Puzzle §4.2).

    Args:
        model: the parent.
        parent: its pass on the held-out sequences.
        layer_idx: i.
        outputs_NTD: per replacement, layer ``i``'s output (e.g. from :func:`variant_layer_output`).

    Returns:
        Per replacement, ``(KL(parent || model), LM loss)`` in nats per token. Layers ``i+1..L-1`` are recomputed
        for all replacements in one batch of K x N sequences; the LM head runs per replacement.
    """
    num_seqs = parent.input_ids_NT.shape[0]
    hidden_BTD = torch.cat(list(outputs_NTD), dim=0)  # B = K x N: replacement k holds rows k*N .. (k+1)*N-1
    for layer in model.model.layers[layer_idx + 1 :]:
        hidden_BTD = layer(hidden_BTD, parent.position_embeddings)
    scores = []
    for k in range(len(outputs_NTD)):
        logits_NTV = model.lm_head(model.model.norm(hidden_BTD[k * num_seqs : (k + 1) * num_seqs]))
        scores.append(parent.score(logits_NTV))
    return scores
