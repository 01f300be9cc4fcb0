"""Reasoning that OpenAI clients can read: nemoforge's vLLM reasoning parser, in vLLM's stream wrapper and served.

Slow: the first test imports vLLM (~10-25 s), the second starts `nemoforge serve` (~30-200 s on 2 shared cores).
SmolLM2-135M-Instruct writes think blocks when the chat shows it two (a few-shot chat, greedy, fp32): the
served replies hold real, model-written ``<think>`` tags spelled in several tokens, without training a model.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import vllm_processes

from nemoforge.serving.server import free_port
from nemoforge.serving.think import PARSER_NAME, split_think

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("needs_vllm")]


REPLIES = [
    "<think>\n12 plus 7 is 19.\n</think>\nThe answer is 19.",
    "The answer is 19.",
    "<think>cut off while reasoning, 12 + 7 = 1",
    "<think>cut off in the tag </thi",
    "<thi",
    "19 </think> then more",
]


def test_vllm_stream_wrapper_gives_the_whole_reply_split(smollm2_dir):
    """vLLM's own DelegatingParser around our parser, token by token with SmolLM2's tokenizer: the streamed
    reasoning/content add up to the non-streamed ones, which are split_think's."""
    from transformers import AutoTokenizer
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.parser.parser_manager import ParserManager

    import nemoforge.serving.vllm_reasoning  # noqa: F401  (registers the parser, as --reasoning-parser-plugin does)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert "<think>" not in tokenizer.get_vocab()  # why deepseek_r1 cannot start on SmolLM2
    parser_cls = ParserManager.get_parser(reasoning_parser_name=PARSER_NAME, tokenizer=tokenizer)
    messages = [{"role": "system", "content": "detailed thinking on"}, {"role": "user", "content": "12 + 7?"}]
    request = ChatCompletionRequest(model="m", messages=messages)
    prompt_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    for reply in REPLIES:
        want_reasoning, want_content = (part or None for part in split_think(reply, final=True))
        reasoning, content, _ = parser_cls(tokenizer, None).parse(reply, request)
        assert (reasoning, content) == (want_reasoning, want_content), reply
        ids = tokenizer.encode(reply, add_special_tokens=False)
        assert len(tokenizer.encode("</think>", add_special_tokens=False)) > 1
        parser, streamed = parser_cls(tokenizer, None), {"reasoning": "", "content": ""}
        for k in range(len(ids)):
            delta = tokenizer.decode(ids[: k + 1]).removeprefix(tokenizer.decode(ids[:k]))
            msg = parser.parse_delta(delta, ids[k : k + 1], request, prompt_ids, finished=k == len(ids) - 1)
            for field in streamed:
                streamed[field] += (getattr(msg, field, None) or "") if msg else ""
        assert streamed == {"reasoning": want_reasoning or "", "content": want_content or ""}, reply
    # usage.completion_tokens_details.reasoning_tokens: the tokens through the one that completes "</think>"
    reasoner = parser_cls(tokenizer, None).reasoning_parser
    ids = tokenizer.encode(REPLIES[0], add_special_tokens=False)
    num = reasoner.count_reasoning_tokens(ids)
    assert "</think>" in tokenizer.decode(ids[:num]) and "</think>" not in tokenizer.decode(ids[: num - 1])
    assert tokenizer.decode(reasoner.extract_content_ids(ids)) == "\nThe answer is 19."
    assert (
        reasoner.count_reasoning_tokens(tokenizer.encode("The answer is 19.", add_special_tokens=False)) == 0
    )


# Two worked examples teach the 135M parent the format; greedy decoding follows it (checked in fp32).
SHOTS = [
    ("What is 2 + 3?", "2 plus 3 is 5.", "The answer is 5."),
    ("What is 4 + 4?", "4 plus 4 is 8.", "The answer is 8."),
]


def _messages(mode: str) -> list[dict]:
    messages = [{"role": "system", "content": f"detailed thinking {mode}"}]
    for question, thinking, answer in SHOTS:
        reply = f"<think>\n{thinking}\n</think>\n{answer}" if mode == "on" else answer
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return messages + [{"role": "user", "content": "What is 6 + 1?"}]


def test_openai_client_reads_reasoning_and_content_from_nemoforge_serve(smollm2_dir, tmp_path):
    """The official openai client against `nemoforge serve` (default serve.reasoning_parser): both modes,
    non-streaming and streaming, and a reply cut off inside its think block."""
    from openai import OpenAI

    port = free_port()
    err_path = tmp_path / "cli.err"
    with err_path.open("w") as err:
        cli = subprocess.Popen(
            [sys.executable, "-m", "nemoforge_cli", "serve", str(smollm2_dir), "--port", str(port),
             "--workdir", str(tmp_path), "--set", "serve.max_model_len=1024", "--set", "serve.dtype=float32"],
            stderr=err, text=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while True:
            assert cli.poll() is None, err_path.read_text()[-3000:]
            assert time.monotonic() < deadline, err_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as resp:
                    model = json.load(resp)["data"][0]["id"]
                break
            except OSError:
                time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=300)
        replies = {}
        for mode in ("on", "off"):
            whole = client.chat.completions.create(
                model=model, messages=_messages(mode), max_tokens=48, temperature=0
            )
            message = whole.choices[0].message
            chunks = list(
                client.chat.completions.create(
                    model=model, messages=_messages(mode), max_tokens=48, temperature=0, stream=True
                )
            )
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            streamed = {
                "reasoning": "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas),
                "content": "".join(d.content or "" for d in deltas),
            }
            replies[mode] = {
                "reasoning": (message.model_extra or {}).get("reasoning"),
                "content": message.content,
                "finish_reason": whole.choices[0].finish_reason,
                "streamed": streamed,
                "stream_finish_reason": [c.choices[0].finish_reason for c in chunks if c.choices][-1],
            }
        cut = client.chat.completions.create(
            model=model, messages=_messages("on"), max_tokens=6, temperature=0
        )
        cut_stream = [
            c.choices[0]
            for c in client.chat.completions.create(
                model=model, messages=_messages("on"), max_tokens=6, temperature=0, stream=True
            )
            if c.choices
        ]
        cut_message = cut.choices[0].message
        replies["cut"] = {
            "reasoning": (cut_message.model_extra or {}).get("reasoning"),
            "content": cut_message.content,
        }
        print(json.dumps(replies, indent=1))  # what docs/serving.md quotes
        on, off = replies["on"], replies["off"]
        assert on["reasoning"] and "7" in on["reasoning"] and "<think>" not in on["reasoning"]
        assert on["content"] and "7" in on["content"] and "think>" not in on["content"]
        assert off["reasoning"] is None and off["content"] and "think>" not in off["content"]
        for mode in ("on", "off"):
            r = replies[mode]
            assert r["finish_reason"] == r["stream_finish_reason"] == "stop"
            assert r["streamed"] == {"reasoning": r["reasoning"] or "", "content": r["content"]}
        # cut off inside the think block: reasoning so far, no answer, finish_reason "length"
        assert cut.choices[0].finish_reason == "length" and cut_stream[-1].finish_reason == "length"
        assert (cut.choices[0].message.model_extra or {}).get("reasoning") and cut.choices[
            0
        ].message.content is None
        assert (
            "".join((c.delta.model_extra or {}).get("reasoning") or "" for c in cut_stream)
            == (cut.choices[0].message.model_extra["reasoning"])
        )
        assert "".join(c.delta.content or "" for c in cut_stream) == ""
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=120) == 0, err_path.read_text()[-2000:]
    finally:
        if cli.poll() is None:
            cli.send_signal(signal.SIGTERM)
            try:
                cli.wait(timeout=120)
            except subprocess.TimeoutExpired:
                cli.kill()
    assert vllm_processes(f"--port {port}") == []
