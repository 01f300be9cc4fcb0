"""Decoupled blockwise local distillation of the narrow FFNs (Puzzle §3 and §3.1, arXiv 2411.19146).

Decoupled BLD trains ``[a_parent (frozen), f_k]`` for every narrow FFN ``f_k`` of every layer; attention variants
here are only ``parent`` and ``no_op``, and neither parent nor no_op blocks are trained (Puzzle §3.1). With the
parent attention frozen, the FFN sub-block's input is the parent's post-attention hidden state, so each narrow FFN
is trained on the parent's own activations to reproduce the parent FFN's output, with the normalized MSE

    L = MSE(o_p, o_c) / MSE(o_p, 0)                                                      (Puzzle §3)

where ``o`` is the FFN sub-block's contribution to the residual stream, ``mlp(norm(h))``. The residual ``h`` is
common to parent and child and cancels in the numerator; leaving it out of the denominator only rescales the
loss (AdamW is invariant to that) and makes it readable: 1.0 is exactly what removing the FFN (no_op) costs.
The pre-FFN RMSNorm stays the parent's and is frozen: its gain is a per-input-channel scale that ``gate_proj``
and ``up_proj`` can absorb, so training it adds nothing.

Calibration activations are consumed in layer order, so :func:`parent_activations` streams them: one layer's
(post-attention, output) pair is held at a time, in the model's dtype, instead of a cache of all layers on disk.

Shape legend: N sequences, T tokens per sequence, M = N * T calibration tokens, D hidden_size,
I parent FFN width, W narrow FFN width.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM, DeciLMMLP
from nemoforge.stages.nas.library import channel_contribution, ffn_intermediate, prune_mlp, top_channels

# At most this share of the calibration tokens is held out to measure loss_init and loss_final.
MAX_EVAL_SHARE = 0.25


@dataclass(frozen=True)
class LayerActivations:
    """The parent's activations around one layer on the calibration sequences.

    Attributes:
        layer_idx: the layer.
        input_NTD: the layer's input (the previous layer's output, or the embeddings).
        post_attention_NTD: after the attention sub-block, i.e. the FFN sub-block's input.
        output_NTD: the layer's output.
    """

    layer_idx: int
    input_NTD: torch.Tensor
    post_attention_NTD: torch.Tensor
    output_NTD: torch.Tensor


@dataclass
class BLDResult:
    """One trained narrow FFN.

    Attributes:
        state: its ``DeciLMMLP`` state dict (``gate_proj``/``up_proj`` (W, D), ``down_proj`` (D, W)).
        channels: the parent channels it was initialized from (Channel Contribution), LongTensor (W,).
        loss_init: normalized MSE on the held-out calibration tokens after pruning, before training.
        loss_final: the same after training.
        losses: the training loss of every step (on that step's batch).
    """

    state: dict[str, torch.Tensor]
    channels: torch.Tensor
    loss_init: float
    loss_final: float
    losses: list[float]

    def mlp(self, model: DeciLMForCausalLM) -> DeciLMMLP:
        """The trained FFN as a module of ``model``'s config and dtype (eval mode)."""
        mlp = DeciLMMLP(model.config, self.state["gate_proj.weight"].shape[0]).to(model.device, model.dtype)
        mlp.load_state_dict(self.state)
        return mlp.eval()


@torch.no_grad()
def parent_activations(model: DeciLMForCausalLM, input_ids_NT: torch.Tensor) -> Iterator[LayerActivations]:
    """Run the parent layer by layer and yield each layer's activations (Puzzle §3: BLD inputs and targets)."""
    hidden_NTD = model.model.embed_tokens(input_ids_NT)
    position_ids_1T = torch.arange(input_ids_NT.shape[1], device=input_ids_NT.device)[None]
    position_embeddings = model.model.rotary_emb(hidden_NTD, position_ids_1T)
    for layer_idx, layer in enumerate(model.model.layers):
        post_attention_NTD = layer.attention_block(hidden_NTD, position_embeddings)
        output_NTD = layer.ffn_block(post_attention_NTD)
        yield LayerActivations(layer_idx, hidden_NTD, post_attention_NTD, output_NTD)
        hidden_NTD = output_NTD


def normalized_mse(pred_MD: torch.Tensor, target_MD: torch.Tensor) -> torch.Tensor:
    """``MSE(target, pred) / MSE(target, 0)`` over all elements (Puzzle §3); a 0-dim tensor."""
    return (target_MD - pred_MD).pow(2).sum() / target_MD.pow(2).sum().clamp_min(1e-30)


def _split_tokens(
    num_tokens: int, batch_tokens: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed held-out evaluation set of calibration tokens and the training rest (index tensors)."""
    num_eval = max(1, min(batch_tokens, int(num_tokens * MAX_EVAL_SHARE)))
    order = torch.randperm(num_tokens, generator=generator)
    return order[:num_eval], order[num_eval:]


def train_ffn(
    mlp: DeciLMMLP,
    normed_MD: torch.Tensor,
    target_MD: torch.Tensor,
    *,
    steps: int,
    batch_tokens: int,
    lr: float,
    generator: torch.Generator,
) -> tuple[float, float, list[float]]:
    """Train ``mlp`` in place so that ``mlp(normed) ~ target`` under the normalized MSE (Puzzle §3).

    AdamW (no weight decay) with a cosine decay from ``lr`` to ``lr / 10``; each step draws ``batch_tokens``
    tokens (an FFN acts on each token alone, so tokens, not sequences, are sampled).

    Args:
        mlp: the narrow FFN, initialized (e.g. by Channel Contribution); float32.
        normed_MD: its input, the parent's normed post-attention hidden state per calibration token.
        target_MD: the parent FFN's output on the same tokens.
        steps, batch_tokens, lr: ``nas.bld``.
        generator: drives the evaluation split and the batches.

    Returns:
        ``(loss_init, loss_final, losses)``: normalized MSE on held-out calibration tokens before and after
        training, and the per-step training losses.
    """
    eval_idx, train_idx = (i.to(normed_MD.device) for i in _split_tokens(normed_MD.shape[0], batch_tokens, generator))
    eval_in, eval_target = normed_MD[eval_idx], target_MD[eval_idx]
    with torch.no_grad():
        loss_init = normalized_mse(mlp(eval_in), eval_target).item()
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, steps)))
    )
    losses = []
    for _ in range(steps):
        batch = train_idx[torch.randint(len(train_idx), (batch_tokens,), generator=generator).to(train_idx.device)]
        loss = normalized_mse(mlp(normed_MD[batch]), target_MD[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    with torch.no_grad():
        loss_final = normalized_mse(mlp(eval_in), eval_target).item()
    return loss_init, loss_final, losses


def distill_layer(
    model: DeciLMForCausalLM,
    acts: LayerActivations,
    widths: tuple[int, ...],
    *,
    steps: int,
    batch_tokens: int,
    lr: float,
    seed: int,
) -> dict[int, BLDResult]:
    """Prune the layer's FFN to each width by Channel Contribution and train it by decoupled BLD (Puzzle App. A, §3).

    Returns:
        Per width, its trained FFN (float32 weights on CPU; trained on the model's device).
    """
    layer = model.model.layers[acts.layer_idx]
    parent_mlp, norm = layer.mlp, layer.post_attention_layernorm
    with torch.no_grad():
        normed_MD = norm(acts.post_attention_NTD).flatten(0, 1).float()
        target_MD = (acts.output_NTD - acts.post_attention_NTD).flatten(0, 1).float()
        mean_abs_I = (
            ffn_intermediate(parent_mlp, normed_MD.to(parent_mlp.gate_proj.weight.dtype))
            .abs()
            .float()
            .mean(0)
        )
        contribution_I = channel_contribution(mean_abs_I, parent_mlp.down_proj.weight)
    results = {}
    for width in widths:
        channels_W = top_channels(contribution_I, width)
        mlp = DeciLMMLP(model.config, width).to(normed_MD.device, torch.float32)
        mlp.load_state_dict({k: v.float() for k, v in prune_mlp(parent_mlp, channels_W).items()})
        generator = torch.Generator().manual_seed(seed * 1_000_003 + acts.layer_idx * 1009 + width)
        loss_init, loss_final, losses = train_ffn(
            mlp, normed_MD, target_MD, steps=steps, batch_tokens=batch_tokens, lr=lr, generator=generator
        )
        state = {k: v.detach().cpu().clone() for k, v in mlp.state_dict().items()}
        results[width] = BLDResult(state, channels_W.cpu(), loss_init, loss_final, losses)
    return results
