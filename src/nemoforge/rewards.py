"""Verifiable rewards for GRPO and eval: plain functions in a dict by name.

Contract (TRL's reward-function contract, ``trl/trainer/grpo_trainer.py``): each function takes
``completions`` plus dataset columns as keyword arguments (``answer``, ``reasoning``, ...; unknown ones
are ignored through ``**kwargs``) and returns one float per completion, or None where it does not apply.
A completion is a string (TRL's standard format) or a list of message dicts (conversational format,
``[{"role": "assistant", "content": "..."}]``), read as its last assistant message's content
(:func:`completion_text`).

LN §5 (arXiv 2505.00949): *accuracy* (LN used a 70B judge; here the final answer read and compared by
:mod:`nemoforge.grading`, math-verify for symbolic references) and *format* (thinking inside
``<think>…</think>`` when "detailed thinking on"; no thinking tags when "off").

**Unscorable rows.** A reward is None where it cannot score a row (accuracy: no gradable reference).
:func:`combined_rewards` never turns None into a number: a row with any None part has total None, and
its consumers leave it out of every mean (GRPO: out of its group's mean and std, with advantage 0,
:func:`~nemoforge.stages.rl.losses.group_advantages`) and count it (``reward_unscorable_fraction``).
TRL instead sums the parts that are not None (``nansum``); a partial sum would put that row on another
scale than its group mates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nemoforge.config import REWARD_NAMES
from nemoforge.data.reasoning import answer_part, toggle_compliant
from nemoforge.grading import answer_matches, parse_reference

RewardFn = Callable[..., list[float | None]]


def completion_text(completion: object) -> str:
    """The text of one completion in either TRL format.

    Args:
        completion: a string, or a list of message dicts (``role``, ``content``); the last message whose role
            is ``assistant`` (or that has no role, as in TRL's examples) is read.

    Raises:
        TypeError: anything else, or a message list without an assistant message with string content.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(m, dict) for m in completion):
        replies = [m for m in completion if m.get("role", "assistant") == "assistant"]
        if replies and isinstance(replies[-1].get("content"), str):
            return replies[-1]["content"]
    raise TypeError(
        "a completion must be a string or a list of message dicts with an assistant message "
        f'([{{"role": "assistant", "content": "..."}}]); got {type(completion).__name__}: {completion!r:.120}'
    )


def answer_correct(completion: str, answer: str) -> bool | None:
    """Whether the final answer of ``completion`` equals the reference ``answer`` (:mod:`nemoforge.grading`).

    A completion cut off inside its think block has no final answer (False).

    Returns:
        None when ``answer`` is not gradable (nothing to check against).
    """
    reference = parse_reference(answer)
    if reference is None:
        return None
    part = answer_part(completion)
    return part is not None and answer_matches(part, reference)


def accuracy_reward(
    completions: Sequence[object], answer: Sequence[str | None], **kwargs: object
) -> list[float | None]:
    """1.0 when the completion's final answer equals the reference, else 0.0; None: no gradable reference.

    Raises:
        TypeError: a completion in neither TRL format (:func:`completion_text`).
    """
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        ok = None if gold is None else answer_correct(completion_text(completion), gold)
        rewards.append(None if ok is None else float(ok))
    return rewards


def format_reward(
    completions: Sequence[object], reasoning: Sequence[str], **kwargs: object
) -> list[float | None]:
    """1.0 when the think-block rule of the completion's mode holds (on: a closed block first; off: no tags).

    An "on" completion cut off inside its think block scores 0.0 (:func:`answer_correct` finds no answer
    in it either).

    Raises:
        TypeError: a completion in neither TRL format (:func:`completion_text`).
    """
    return [
        float(toggle_compliant(completion_text(c), r))  # type: ignore[arg-type]
        for c, r in zip(completions, reasoning, strict=True)
    ]


REWARDS: dict[str, RewardFn] = dict(zip(REWARD_NAMES, (accuracy_reward, format_reward), strict=True))
"""The reward functions by their names in :data:`nemoforge.config.REWARD_NAMES` (which the recipe is checked with)."""


def combined_rewards(
    weights: dict[str, float], completions: Sequence[object], **columns: Sequence[object]
) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """Weighted sum of the named rewards per completion, and each reward's values.

    Returns:
        ``(total, parts)``: ``total[i]`` is None when any named reward is None for completion ``i``
        (unscorable; never counted as 0); ``parts[name]`` are that reward's values.
    """
    parts = {name: REWARDS[name](completions, **columns) for name in weights}
    total = [
        None if None in row else sum(w * v for w, v in zip(weights.values(), row, strict=True))
        for row in zip(*parts.values(), strict=True)
    ]
    return total, parts
