"""Chat generation under the reasoning toggle, shared by the reasoning stages (sft, rl, eval).

Replies to ``(prompt, reasoning)`` chats through the KV-cached decoder (:func:`nemoforge.models.generate.generate_ids`)
and the share of replies that follow their mode. Shape legend: ``B`` prompts, ``T`` prompt tokens, ``N`` new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from nemoforge.data.reasoning import Reasoning, encode_prompt, toggle_compliant
from nemoforge.models.generate import generate_ids


def generate_chats(
    model: torch.nn.Module,
    tokenizer: Any,
    chats: Sequence[tuple[str, Reasoning]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    desc: str | None = None,
) -> list[str]:
    """The assistant's reply text to each ``(prompt, reasoning)`` under the toggle system prompt.

    ``desc``: label of a progress bar over the replies (None: none).
    """
    prompt_ids = [encode_prompt(tokenizer, prompt, reasoning) for prompt, reasoning in chats]
    new_ids = generate_ids(
        model,
        tokenizer,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        generator=generator,
        desc=desc,
    )
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]


def toggle_compliance(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Share of greedy replies that follow their mode (:func:`~nemoforge.data.reasoning.toggle_compliant`).

    "On" needs a closed think block first: a reply cut off inside its block at ``max_new_tokens`` does not
    count (the GRPO format reward and eval use the same rule).

    Returns:
        ``({"toggle_on": share, "toggle_off": share, "toggle": mean of both}, samples)`` where samples are
        ``{"prompt", "reasoning", "response"}`` dicts (logged as an artifact).
    """
    chats = [(p, r) for r in ("on", "off") for p in prompts]
    replies = generate_chats(
        model, tokenizer, chats, max_new_tokens=max_new_tokens, batch_size=batch_size, desc="toggle check"
    )
    ok = {"on": [], "off": []}
    for (_, reasoning), reply in zip(chats, replies, strict=True):
        ok[reasoning].append(toggle_compliant(reply, reasoning))
    on, off = sum(ok["on"]) / len(ok["on"]), sum(ok["off"]) / len(ok["off"])
    samples = [{"prompt": p, "reasoning": r, "response": t} for (p, r), t in zip(chats, replies, strict=True)]
    return {"toggle_on": on, "toggle_off": off, "toggle": (on + off) / 2}, samples
