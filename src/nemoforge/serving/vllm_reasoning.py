"""vLLM reasoning-parser plugin ``nemoforge_think``: think tags found in the text, not as single tokens.

Loaded by vLLM's OpenAI server with ``--reasoning-parser-plugin nemoforge.serving.vllm_reasoning
--reasoning-parser nemoforge_think`` (:func:`nemoforge.serving.server.server_command` adds both); it is
imported only in vLLM's processes (API server and engine core), never by nemoforge itself. The split
rules are :mod:`nemoforge.serving.think`'s: a reply that opens with ``<think>`` has its block in the
``reasoning`` field and the rest in ``content``; any other reply ("detailed thinking off") is all
``content``; a reply cut off inside the block is all ``reasoning``.

vLLM's streaming wrapper (``DelegatingParser.parse_delta``, vllm 0.32) calls
:meth:`ThinkTextReasoningParser.extract_reasoning_streaming` on each delta until
:meth:`~ThinkTextReasoningParser.is_reasoning_end_streaming` says that ``</think>`` was completed; after
that it passes the text through as content, which is the same rule. Text held back at the end of a
reply (an undecided ``<th``) is sent as content by ``get_streaming_fallback_content``, which vLLM calls
when a stream finishes before reasoning ended.

Structured outputs (``response_format``) start constraining after ``</think>``; an "off" reply has none,
so with this parser they do not constrain "off" replies unless the request sets ``include_reasoning:
false`` (then vLLM constrains from the first token).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from vllm.entrypoints.generate.base.protocol import DeltaMessage
from vllm.reasoning import ReasoningParser, ReasoningParserManager

from nemoforge.serving.think import (
    PARSER_NAME,
    THINK_CLOSE,
    THINK_OPEN,
    split_think,
    think_closed,
    think_delta,
)

_TAG_WINDOW_TOKENS = 16  # more than any tokenizer spends on "</think>" (SmolLM2: 3 tokens)


class ThinkTextReasoningParser(ReasoningParser):
    """Reasoning parser for ``<think>…</think>`` spelled in any number of tokens (see the module docstring)."""

    @property
    def reasoning_start_str(self) -> str:
        return THINK_OPEN

    @property
    def reasoning_end_str(self) -> str:
        return THINK_CLOSE

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.model_tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
        """True when the text ends with ``</think>``: a prompt whose template closed an empty block.

        vLLM asks this of the prompt. A prompt with earlier turns' think blocks in it is still open: the
        reply decides (:meth:`extract_reasoning_streaming`).
        """
        return self._decode(input_ids[-_TAG_WINDOW_TOKENS:]).rstrip().endswith(THINK_CLOSE)

    def is_reasoning_end_streaming(self, input_ids: Sequence[int], delta_ids: Iterable[int]) -> bool:
        """True when the last tokens (``delta_ids``, the end of ``input_ids``) completed a ``</think>``."""
        num_delta = len(list(delta_ids))
        if num_delta == 0:
            return False
        window = list(input_ids[-(num_delta + _TAG_WINDOW_TOKENS) :])
        text, before = self._decode(window), self._decode(window[:-num_delta])
        at = text.rfind(THINK_CLOSE)
        return at >= 0 and at + len(THINK_CLOSE) > len(before)

    def extract_content_ids(self, input_ids: list[int]) -> list[int]:
        """The token ids after the one that closed the think block; all of them when the reply has none."""
        if not self._decode(input_ids).lstrip().startswith(THINK_OPEN):
            return list(input_ids)
        for k in range(1, len(input_ids) + 1):
            if think_closed(self._decode(input_ids[:k])):
                return list(input_ids[k:])
        return []

    def count_reasoning_tokens(self, token_ids: Sequence[int]) -> int:
        """Tokens up to the one that closes the think block, tags included (binary search over decodes)."""
        ids = list(token_ids)
        text = self._decode(ids)
        if not text.lstrip().startswith(THINK_OPEN):
            return 0
        if not think_closed(text):
            return len(ids)
        lo, hi = 1, len(ids)  # think_closed(prefix of hi tokens) holds, and stays true for longer prefixes
        while lo < hi:
            mid = (lo + hi) // 2
            if think_closed(self._decode(ids[:mid])):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def extract_reasoning(self, model_output: str, request) -> tuple[str | None, str | None]:
        """``(reasoning, content)`` of a whole reply; None for a part that is absent or empty."""
        reasoning, content = split_think(model_output, final=True)
        return reasoning or None, content or None

    def extract_reasoning_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
    ) -> DeltaMessage | None:
        """The reasoning and content this delta lets us send; None while it is all held back."""
        reasoning, content = think_delta(previous_text, current_text)
        if not reasoning and not content:
            return None
        return DeltaMessage(reasoning=reasoning or None, content=content or None)

    def get_streaming_fallback_content(self, previous_text: str, request) -> str | None:
        """At the end of a stream: the answer text still held back (an undecided start such as ``"<th"``)."""
        sent = split_think(previous_text, final=False)[1]
        return split_think(previous_text, final=True)[1][len(sent) :] or None


ReasoningParserManager.register_module(PARSER_NAME, module=ThinkTextReasoningParser)
