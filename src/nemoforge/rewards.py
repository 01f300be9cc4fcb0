"""Verifiable rewards for GRPO and eval: plain functions in a dict by name.

Contract (TRL's reward-function contract, ``trl/trainer/grpo_trainer.py``): each function takes
``completions`` (the generated assistant texts) plus dataset columns as keyword arguments (``answer``,
``reasoning``, ...; unknown ones are ignored through ``**kwargs``) and returns one float per completion,
or None where it does not apply.

LN §5 (arXiv 2505.00949): *accuracy* (LN used a 70B judge; here math-verify, as TRL's
``accuracy_reward``) and *format* (thinking inside ``<think>…</think>`` when "detailed thinking on";
no thinking tags when "off").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from math_verify import parse, verify

from nemoforge.data.reasoning import strip_thinking, toggle_compliant

RewardFn = Callable[..., list[float | None]]


def answer_correct(completion: str, answer: str) -> bool | None:
    """Whether the final answer in ``completion`` (after any think block) equals ``answer`` (math-verify).

    Returns None when the reference itself does not parse (nothing to check against).
    """
    gold = parse(answer)
    if not gold:
        return None
    predicted = parse(strip_thinking(completion))
    return bool(predicted) and verify(gold, predicted)


def accuracy_reward(completions: Sequence[str], answer: Sequence[str | None], **kwargs: object) -> list[float | None]:
    """1.0 when the completion's final answer matches the reference by math-verify, else 0.0 (None: no reference)."""
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        ok = None if gold is None else answer_correct(completion, gold)
        rewards.append(None if ok is None else float(ok))
    return rewards


def format_reward(completions: Sequence[str], reasoning: Sequence[str], **kwargs: object) -> list[float | None]:
    """1.0 when the think-block rule of the completion's mode holds (on: a closed block first; off: no tags)."""
    return [float(toggle_compliant(c, r)) for c, r in zip(completions, reasoning, strict=True)]  # type: ignore[arg-type]


REWARDS: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward}


def combined_rewards(
    weights: dict[str, float], completions: Sequence[str], **columns: Sequence[object]
) -> tuple[list[float], dict[str, list[float | None]]]:
    """Weighted sum of the named rewards per completion (None counts as 0) and each reward's values."""
    parts = {name: REWARDS[name](completions, **columns) for name in weights}
    total = [
        sum(weights[name] * (parts[name][i] or 0.0) for name in weights) for i in range(len(completions))
    ]
    return total, parts
