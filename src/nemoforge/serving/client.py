"""A minimal OpenAI chat client over the standard library: streaming, TTFT, tokens/s, reasoning split.

TTFT is the time from sending the request to the first streamed chunk that carries text (reasoning or
content). Output tokens come from the server's ``usage`` (``stream_options.include_usage``); output
tokens/s is (output tokens - 1) / (time of the last token - time of the first): the decode rate.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

from nemoforge.errors import NemoforgeError

_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)


def split_reasoning(text: str) -> tuple[str, str]:
    """``(reasoning, answer)`` of a completion that may hold ``<think>…</think>`` (LN §3 reasoning toggle).

    Text before a lone ``</think>`` (a chat template that opened the tag itself) is reasoning; an
    unclosed ``<think>`` makes the rest reasoning; text without tags is all answer.
    """
    if "<think>" in text:
        reasoning = "".join(m.group(1) for m in _THINK.finditer(text))
        answer = _THINK.sub("", text)
        return reasoning.strip(), answer.strip()
    if "</think>" in text:
        reasoning, _, answer = text.partition("</think>")
        return reasoning.strip(), answer.strip()
    return "", text.strip()


@dataclass(frozen=True)
class ChatResult:
    """One chat completion: text split into reasoning and answer, with its timings."""

    system_prompt: str
    prompt: str
    reasoning: str
    answer: str
    output_tokens: int
    ttft_s: float
    total_s: float
    output_tokens_per_s: float

    def to_json(self) -> dict:
        return asdict(self)


def chat(
    base_url: str,
    model: str,
    prompt: str,
    *,
    system_prompt: str | None = None,
    max_tokens: int = 128,
    temperature: float = 0.0,
    timeout_s: float = 600,
    extra: dict | None = None,
) -> ChatResult:
    """Send one streaming chat completion to an OpenAI-compatible server (vLLM) and time it.

    Reasoning is taken from the server's ``reasoning``/``reasoning_content`` deltas (a
    ``--reasoning-parser``) and from ``<think>`` tags left in the content (no parser).

    ``extra`` adds request fields (vLLM's ``ignore_eos``/``min_tokens`` fix the output length in benchmarks).

    Raises:
        NemoforgeError: the server refused the request or could not be reached.
    """
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + [
        {"role": "user", "content": prompt}
    ]
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    reasoning_parts, content_parts = [], []
    output_tokens = 0
    t_first = t_last = None
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    output_tokens = event["usage"].get("completion_tokens", output_tokens)
                for choice in event.get("choices", []):
                    delta = choice.get("delta", {})
                    reasoning = delta.get("reasoning") or delta.get("reasoning_content") or ""
                    content = delta.get("content") or ""
                    if reasoning or content:
                        t_last = time.perf_counter()
                        t_first = t_first or t_last
                    reasoning_parts.append(reasoning)
                    content_parts.append(content)
    except urllib.error.HTTPError as err:
        raise NemoforgeError(
            f"{base_url} refused the chat request ({err.code}): {err.read().decode()[:300]}"
        ) from None
    except (urllib.error.URLError, OSError) as err:
        raise NemoforgeError(f"cannot reach {base_url}: {err}") from None
    total = time.perf_counter() - t0
    tagged_reasoning, answer = split_reasoning("".join(content_parts))
    reasoning = "".join(reasoning_parts).strip() or tagged_reasoning
    decode_s = (t_last - t_first) if t_first is not None else 0.0
    return ChatResult(
        system_prompt=system_prompt or "",
        prompt=prompt,
        reasoning=reasoning,
        answer=answer,
        output_tokens=output_tokens,
        ttft_s=(t_first - t0) if t_first is not None else total,
        total_s=total,
        output_tokens_per_s=(output_tokens - 1) / decode_s if decode_s > 0 and output_tokens > 1 else 0.0,
    )
