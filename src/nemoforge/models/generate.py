"""A KV-cached decode loop for ``DeciLMForCausalLM``: teacher-corpus sampling, the decode tokens/s benchmark, and
batched generation from token rows of unequal length (:func:`generate_ids`: left-padded, cut at EOS).

Faster than ``model.generate`` at batch 1 because each step does only the forward: the KV cache is preallocated
once (``StaticKVCache``: one (B, K, S_max, Dh) buffer pair per attention layer, no concatenation), logits are
computed for the last position only, and no logits processors, stopping criteria or mask rebuilding run per step.
On CUDA the decode step is captured once in a CUDA graph and replayed per token (batch-1 decode of a small model
is bound by kernel launches, one per op, not by the GPU); the cache then spans a fixed S_max and a mask hides
the positions not yet written.

Shape legend: B batch, T prompt tokens, N new tokens, S cached tokens, K KV heads of a layer, Dh head_dim,
V vocab size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM
from nemoforge.runtime import no_progress


class StaticKVCache:
    """Preallocated keys/values for every attention layer of a model, filled left to right.

    Implements the part of the transformers ``Cache`` interface the model uses: ``update(k, v, slot)`` and
    ``get_seq_length(slot=0)``; slot ``j`` is the model's j-th attention layer (``attn.cache_idx``).

    Args:
        model: the model whose attention layers get a slot.
        batch_size: B.
        max_len: S_max, tokens the cache can hold (prompt + new tokens).
    """

    def __init__(self, model: DeciLMForCausalLM, batch_size: int, max_len: int) -> None:
        param = model.get_input_embeddings().weight
        self.max_len = max_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer in model.model.layers:
            if layer.self_attn is None:
                continue
            shape = (batch_size, layer.self_attn.num_key_value_heads, max_len, layer.self_attn.head_dim)
            # zeros, not empty: a fixed-shape step attends over unwritten slots too (masked, weight 0, and 0 * NaN
            # would still be NaN)
            self.keys.append(torch.zeros(shape, dtype=param.dtype, device=param.device))
            self.values.append(torch.zeros(shape, dtype=param.dtype, device=param.device))
        self.lengths = [0] * len(self.keys)
        self.write_pos_1: torch.Tensor | None = None
        """When set (LongTensor (1,)): fixed-shape mode; ``update`` writes one token there, returns all S_max slots."""

    def update(
        self, k_BKTDh: torch.Tensor, v_BKTDh: torch.Tensor, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append T tokens to slot ``slot``; returns all its keys and values so far, (B, K, S, Dh) views.

        Raises:
            ValueError: the cache is full.
        """
        if self.write_pos_1 is not None:  # cast like the slice write below (bf16 autocast over fp32 weights)
            self.keys[slot].index_copy_(2, self.write_pos_1, k_BKTDh.to(self.keys[slot].dtype))
            self.values[slot].index_copy_(2, self.write_pos_1, v_BKTDh.to(self.values[slot].dtype))
            return self.keys[slot], self.values[slot]
        start = self.lengths[slot]
        end = start + k_BKTDh.shape[2]
        if end > self.max_len:
            raise ValueError(f"StaticKVCache holds {self.max_len} tokens; {end} requested")
        self.keys[slot][:, :, start:end] = k_BKTDh
        self.values[slot][:, :, start:end] = v_BKTDh
        self.lengths[slot] = end
        return self.keys[slot][:, :, :end], self.values[slot][:, :, :end]

    def get_seq_length(self, slot: int = 0) -> int:
        """Tokens cached in slot ``slot`` (0 for a model without attention)."""
        return self.lengths[slot] if self.lengths else 0


_Out = TypeVar("_Out")


def capture_cuda_graph(fn: Callable[[], _Out], device: torch.device) -> tuple[torch.cuda.CUDAGraph, _Out]:
    """Capture ``fn()`` in a CUDA graph, after two warm-up calls on a side stream (as ``torch.cuda.graph`` asks).

    Args:
        fn: a call whose tensors are all on ``device`` and keep their addresses between calls.
        device: the CUDA device.

    Returns:
        The graph (``graph.replay()`` reruns the captured kernels) and ``fn``'s output from the capture, whose
        tensors each replay overwrites.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class FixedShapeDecodeStep:
    """One decode step of a batch (B tokens -> next-token logits (B, V)) with fixed shapes, for CUDA graphs.

    The cache is put in fixed-shape mode: each call writes the new keys/values at slot ``write_pos`` and attends
    over all S_max slots under the mask ``slot <= write_pos and pad_mask_BS``. With ``cuda_graph`` the step is
    captured once and each call is one graph replay; without, it runs eagerly (the same arithmetic; for tests).

    Args:
        model: the model.
        cache: its ``StaticKVCache``, already holding the prompt.
        pad_mask_BS: boolean (B, S_max), False at left-padding slots of the prompt.
        first_write_pos: the slot of the first decoded token (the prompt length T).
        cuda_graph: capture the step in a CUDA graph (the model must be on CUDA).
    """

    def __init__(
        self,
        model: DeciLMForCausalLM,
        cache: StaticKVCache,
        pad_mask_BS: torch.Tensor,
        first_write_pos: int,
        *,
        cuda_graph: bool,
    ) -> None:
        B, S = pad_mask_BS.shape
        device = pad_mask_BS.device
        self.model, self.cache, self.pad_mask_BS = model, cache, pad_mask_BS
        self.token_B1 = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.position_B1 = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.write_pos_1 = torch.full((1,), first_write_pos, dtype=torch.long, device=device)
        self.slot_S = torch.arange(S, device=device)
        cache.write_pos_1 = self.write_pos_1
        self.graph = None
        if cuda_graph:
            # The warm-up calls write slot first_write_pos, which the first real step overwrites before reading it.
            self.graph, self.logits_BV = capture_cuda_graph(self._step, device)

    def attention_mask(self) -> torch.Tensor:
        """Boolean (B, 1, 1, S_max): the slots a step attends, ``slot <= write_pos`` and not left padding."""
        return ((self.slot_S <= self.write_pos_1) & self.pad_mask_BS)[:, None, None, :]

    def _step(self) -> torch.Tensor:
        return self.model(
            input_ids=self.token_B1,
            position_ids=self.position_B1,
            attention_mask=self.attention_mask(),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]

    def __call__(self, token_B: torch.Tensor, position_B1: torch.Tensor, write_pos: int) -> torch.Tensor:
        """Logits (B, V) after feeding ``token_B`` at RoPE positions ``position_B1`` into cache slot ``write_pos``.

        Under a CUDA graph the returned tensor is overwritten by the next call.
        """
        self.token_B1.copy_(token_B[:, None])
        self.position_B1.copy_(position_B1)
        self.write_pos_1.fill_(write_pos)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits_BV


def _sample(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token ids (B,): greedy when ``temperature == 0``, else nucleus sampling at ``temperature``."""
    if temperature == 0.0:
        return logits_BV.argmax(-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the top one always stays).
        drop_BV = (sorted_BV.cumsum(-1) - sorted_BV) >= top_p
        sorted_BV = sorted_BV.masked_fill(drop_BV, 0.0)
        choice_B1 = torch.multinomial(sorted_BV, 1, generator=generator)
        return order_BV.gather(-1, choice_B1).squeeze(-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: DeciLMForCausalLM,
    input_ids_BT: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    attention_mask_BT: torch.Tensor | None = None,
    cuda_graph: bool | None = None,
) -> torch.Tensor:
    """Decode up to ``max_new_tokens`` tokens after each prompt with a static KV cache.

    Args:
        model: a ``DeciLMForCausalLM`` (run in eval mode for the call; its mode is restored after).
        input_ids_BT: prompts (LongTensor, on the model's device); left-padded when lengths differ.
        max_new_tokens: N.
        temperature: 0 = greedy (argmax); otherwise sampling temperature.
        top_p: nucleus threshold in (0, 1] (sampling only).
        eos_token_id: a sequence that emits one of these ids is finished; afterwards it is filled with the
            (first) eos id. Decoding stops early once every sequence is finished.
        generator: torch RNG for sampling (reproducible corpora).
        attention_mask_BT: 1 = token, 0 = left padding; None = no padding.
        cuda_graph: replay the decode step as a CUDA graph; default: when the inputs are on a CUDA device.

    Returns:
        LongTensor (B, T + n) with n <= N: the prompts followed by the new tokens.

    Raises:
        ValueError: ``max_new_tokens`` < 1, ``temperature`` < 0, ``top_p`` outside (0, 1], or ``cuda_graph``
            without CUDA.
    """
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1; got "
            f"{max_new_tokens}, {temperature}, {top_p}"
        )
    B, T = input_ids_BT.shape
    device = input_ids_BT.device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    elif cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA inputs, got device {device}")
    eos_ids = (
        []
        if eos_token_id is None
        else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    )
    eos_t = torch.tensor(eos_ids, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        cache = StaticKVCache(model, B, T + max_new_tokens)
        if attention_mask_BT is not None and bool(attention_mask_BT.all()):
            attention_mask_BT = None  # no padding: plain causal attention, no mask per step
        if attention_mask_BT is None:
            position_ids_BT = torch.arange(T, device=device)[None]
        else:
            attention_mask_BT = attention_mask_BT.long()
            position_ids_BT = (attention_mask_BT.cumsum(-1) - 1).clamp(min=0)
        logits_B1V = model(
            input_ids=input_ids_BT,
            attention_mask=attention_mask_BT,
            position_ids=position_ids_BT,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        next_pos_B1 = position_ids_BT[:, -1:] + 1
        graph_step = None
        if cuda_graph and max_new_tokens > 1:
            pad_mask_BS = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)
            if attention_mask_BT is not None:
                pad_mask_BS[:, :T] = attention_mask_BT.bool()
            graph_step = FixedShapeDecodeStep(model, cache, pad_mask_BS, first_write_pos=T, cuda_graph=True)
        new_tokens: list[torch.Tensor] = []
        finished_B = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token_B = _sample(logits_B1V[:, -1], temperature, top_p, generator)
            if eos_ids:
                token_B = torch.where(finished_B, eos_t[0], token_B)
                finished_B = finished_B | torch.isin(token_B, eos_t)
            new_tokens.append(token_B)
            if step == max_new_tokens - 1 or (eos_ids and bool(finished_B.all())):
                break
            if graph_step is not None:
                logits_B1V = graph_step(token_B, next_pos_B1, T + step)[:, None]
            else:
                if attention_mask_BT is not None:
                    attention_mask_BT = torch.cat(
                        [attention_mask_BT, attention_mask_BT.new_ones(B, 1)], dim=1
                    )
                logits_B1V = model(
                    input_ids=token_B[:, None],
                    attention_mask=attention_mask_BT,
                    position_ids=next_pos_B1,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits
            next_pos_B1 = next_pos_B1 + 1
        return torch.cat([input_ids_BT, torch.stack(new_tokens, dim=1)], dim=1)
    finally:
        model.train(was_training)


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids_BT, attention_mask_BT)`` of token rows left-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = [[pad_token_id] * (width - len(r)) + list(r) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def generate_ids(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    desc: str | None = None,
) -> list[list[int]]:
    """New token ids per prompt, cut after the first EOS (which is kept).

    ``desc``: label of a progress bar over the replies (None: no bar; ``NEMOFORGE_NO_PROGRESS=1`` hides it).
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    bar = tqdm(total=len(prompt_ids), desc=desc, unit="reply", disable=desc is None or no_progress(), leave=False)
    for start in range(0, len(prompt_ids), batch_size):
        ids_BT, mask_BT = left_pad(prompt_ids[start : start + batch_size], pad_id(tokenizer))
        full = generate(
            model,
            ids_BT.to(device),
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_token_id=eos,
            generator=generator,
            attention_mask_BT=mask_BT.to(device),
        )
        for row in full[:, ids_BT.shape[1] :].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
        bar.update(ids_BT.shape[0])
    bar.close()
    return out
