"""IFEval instruction following, strict (Zhou et al. 2023, arXiv 2311.07911; LN §7.1 "IFEval strict").

The instruction checks are lm-evaluation-harness's (``lm_eval.tasks.ifeval``, the Google reference
checkers it maintains); this module only reads the prompts, samples them, and aggregates the booleans:

- prompt-level strict accuracy: share of prompts whose response follows *every* instruction;
- instruction-level strict accuracy: share of all instructions (over all prompts) that are followed.

Two checkers (``length_constraints:number_sentences``, ``change_case:capital_word_frequency``) need
NLTK's ``punkt_tab`` data. lm-eval downloads it at import when it is missing; a pipeline step fetches
nothing at run time, so the download is refused here and the prompts using those checkers are left out
of the sample (:func:`unavailable_instructions` names them). Install the data beside the checkers to
include them: ``python -m nltk.downloader -d /usr/local/share/nltk_data punkt_tab``.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from nemoforge.errors import InputNotFoundError, NemoforgeError

_PROBE_RESPONSE = "This is a probe. It has two sentences."


@dataclass(frozen=True)
class IFEvalPrompt:
    """One row of IFEval's ``input_data.jsonl``: a prompt and its verifiable instructions.

    Attributes:
        key: the row's id in the file.
        prompt: the user message.
        instruction_id_list: checker ids (``punctuation:no_comma``, ...), one per instruction.
        kwargs: the checker arguments, one dict per instruction (same order).
    """

    key: int
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]


def read_ifeval(path: Path) -> list[IFEvalPrompt]:
    """The rows of an IFEval ``input_data.jsonl`` (fields ``key``, ``prompt``, ``instruction_id_list``, ``kwargs``).

    Raises:
        InputNotFoundError: ``path`` is not a file.
        NemoforgeError: a line is not JSON, lacks a field, or has kwargs that do not pair with its instructions.
    """
    if not path.is_file():
        raise InputNotFoundError(f"{path} does not exist: give IFEval's input_data.jsonl")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = IFEvalPrompt(
                int(row["key"]), row["prompt"], tuple(row["instruction_id_list"]), tuple(row["kwargs"])
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise NemoforgeError(f"{path}:{i} is not an IFEval row (key, prompt, instruction_id_list, kwargs): {err}") from None
        if len(prompt.kwargs) != len(prompt.instruction_id_list):
            raise NemoforgeError(f"{path}:{i}: {len(prompt.kwargs)} kwargs for {len(prompt.instruction_id_list)} instructions")
        rows.append(prompt)
    return rows


@cache
def _checkers() -> ModuleType:
    """``lm_eval.tasks.ifeval.utils``, imported without its run-time NLTK download (see the module docstring)."""
    import langdetect
    import nltk

    # response_language and the case checkers call langdetect, which samples: fix its seed (langdetect's own knob)
    langdetect.DetectorFactory.seed = 0
    download = nltk.download
    nltk.download = lambda *args, **kwargs: False  # no network from a pipeline step: missing data stays missing
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Downloaded punkt_tab" whatever happened
            from lm_eval.tasks.ifeval import utils
    finally:
        nltk.download = download
    return utils


def follow_strict(prompt: IFEvalPrompt, response: str) -> list[bool]:
    """Whether ``response`` follows each of ``prompt``'s instructions (lm-eval's strict check, no loosening).

    Returns:
        one bool per entry of ``prompt.instruction_id_list``.

    Raises:
        KeyError: an instruction id that lm-eval's registry does not know.
        LookupError: a checker needs NLTK data that is not installed (``punkt_tab``).
    """
    utils = _checkers()
    example = utils.InputExample(
        key=prompt.key,
        instruction_id_list=list(prompt.instruction_id_list),
        prompt=prompt.prompt,
        kwargs=[dict(kw) for kw in prompt.kwargs],
    )
    return list(utils.test_instruction_following_strict(example, response).follow_instruction_list)


def unavailable_instructions(prompts: Sequence[IFEvalPrompt]) -> list[str]:
    """Instruction ids of ``prompts`` whose checker cannot run on this machine (missing NLTK data), sorted."""
    missing, probed = set(), set()
    for p in prompts:
        for instruction_id, kwargs in zip(p.instruction_id_list, p.kwargs, strict=True):
            if instruction_id in probed:
                continue
            probed.add(instruction_id)
            try:
                follow_strict(IFEvalPrompt(p.key, p.prompt, (instruction_id,), (kwargs,)), _PROBE_RESPONSE)
            except LookupError:
                missing.add(instruction_id)
    return sorted(missing)


def sample_prompts(
    prompts: Sequence[IFEvalPrompt], num_prompts: int | None, *, seed: int, exclude: Sequence[str] = ()
) -> list[IFEvalPrompt]:
    """``num_prompts`` prompts drawn without replacement (seeded), in file order, none using an ``exclude`` id.

    ``num_prompts`` None (or above what is left): every prompt that remains.
    """
    left = [p for p in prompts if not set(p.instruction_id_list) & set(exclude)]
    if num_prompts is None or num_prompts >= len(left):
        return left
    chosen = set(random.Random(seed).sample(range(len(left)), num_prompts))
    return [p for i, p in enumerate(left) if i in chosen]


def strict_accuracy(followed: Sequence[Sequence[bool]]) -> dict[str, float]:
    """Prompt- and instruction-level strict accuracy of per-prompt instruction results (IFEval §3).

    Args:
        followed: one list of bools per prompt, one bool per instruction.

    Returns:
        ``{"ifeval_prompt_strict": share of prompts with all instructions followed,
        "ifeval_instruction_strict": share of all instructions followed}``, both in [0, 1].

    Raises:
        ValueError: no prompts, or a prompt with no instructions.
    """
    if not followed or any(len(row) == 0 for row in followed):
        raise ValueError("strict_accuracy needs at least one prompt, each with at least one instruction")
    flat = [ok for row in followed for ok in row]
    return {
        "ifeval_prompt_strict": sum(all(row) for row in followed) / len(followed),
        "ifeval_instruction_strict": sum(flat) / len(flat),
    }
