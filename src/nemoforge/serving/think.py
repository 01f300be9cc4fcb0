"""Split a reply into reasoning and answer by the text of its think tags, streamed or whole (LN §3 toggle).

A Llama-Nemotron reply in "detailed thinking on" mode opens with ``<think>…</think>`` and then answers; in
"off" mode it answers directly. Of vLLM 0.32's parsers, ``deepseek_r1`` needs ``<think>``/``</think>`` as
single tokens of the vocabulary (SmolLM2's tokenizer spells them in several) and ``qwen3`` treats a reply
without ``</think>`` as all reasoning (an "off" answer arrives with ``content: null``; docs/serving.md).
This module decides on the **text**:

- a reply whose first non-blank characters are ``<think>``: the text inside the block is reasoning, the
  text after ``</think>`` is the answer, verbatim (vLLM's convention: the newline after the tag stays);
- any other reply: all answer, verbatim, tags included (a think block that does not open the reply is
  not the toggle's format);
- a reply cut off inside the block: all reasoning and no answer; the start of a ``</think>`` cut in half
  at the end is tag residue and belongs to neither.

While streaming, text that may still turn into a tag (a leading ``<th``, a trailing ``</thi``, blanks
before the first tag) is held back until the next characters decide it; everything else is sent at
once. :func:`split_think` with ``final=False`` returns only what can be sent, so two calls on successive
texts differ by a delta to send (:func:`think_delta`), and the deltas of a stream, with what was still held
back at its end, add up to the ``final=True`` split of the whole reply. Standard library only: vLLM's plugin
(:mod:`nemoforge.serving.vllm_reasoning`) and the tests import it without each other.
"""

from __future__ import annotations

# The sft format's tags (nemoforge.data.reasoning), spelled again here: vLLM's processes import this module,
# and nemoforge.data pulls torch and the recipe schema.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
PARSER_NAME = "nemoforge_think"
"""vLLM ``--reasoning-parser`` name of this split."""
PARSER_PLUGIN = "nemoforge.serving.vllm_reasoning"
"""vLLM ``--reasoning-parser-plugin`` (a module the vLLM interpreter imports) that registers :data:`PARSER_NAME`."""


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag`` (``"ab</th"``, ``"</think>"`` -> 4)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_think(text: str, *, final: bool) -> tuple[str, str]:
    """``(reasoning, answer)`` of a reply, or of the part of an unfinished one that can be sent now.

    Args:
        text: the reply so far (detokenized model output, no prompt).
        final: True when the reply is complete: nothing is held back any more, and an undecided start
            (``"<th"``, blanks) is answer text.

    Returns:
        reasoning and answer, each ``""`` when absent. ``"<think>\\n2+2=4\\n</think>\\n4"`` ->
        ``("\\n2+2=4\\n", "\\n4")``; ``"4"`` -> ``("", "4")``; ``"<think>so 2+2 is</th"`` ->
        ``("so 2+2 is", "")``; ``"<thi"`` -> ``("", "")`` while streaming, ``("", "<thi")`` when final.
    """
    head = text.lstrip()
    if not head.startswith(THINK_OPEN):
        if not final and THINK_OPEN.startswith(head):  # blank, or the start of "<think>": undecided
            return "", ""
        return "", text
    body = head[len(THINK_OPEN) :]
    end = body.find(THINK_CLOSE)
    if end >= 0:
        return body[:end], body[end + len(THINK_CLOSE) :]
    return body[: len(body) - _partial_tag_suffix(body, THINK_CLOSE)], ""


def think_delta(previous_text: str, current_text: str) -> tuple[str, str]:
    """``(reasoning, answer)`` text to send when an unfinished reply grows from ``previous_text`` to ``current_text``."""
    prev_reasoning, prev_answer = split_think(previous_text, final=False)
    reasoning, answer = split_think(current_text, final=False)
    return reasoning[len(prev_reasoning) :], answer[len(prev_answer) :]


def think_closed(text: str) -> bool:
    """True when ``text`` opens with a think block (blanks allowed) that is closed (the answer may follow)."""
    head = text.lstrip()
    return head.startswith(THINK_OPEN) and THINK_CLOSE in head[len(THINK_OPEN) :]
