"""The think-tag split of served replies (nemoforge.serving.think), whole and streamed, on literal texts."""

from __future__ import annotations

import pytest

from nemoforge.serving.server import server_command
from nemoforge.serving.think import PARSER_NAME, PARSER_PLUGIN, split_think, think_closed, think_delta

REPLIES = {
    # reply: its final (reasoning, answer)
    "<think>\n12 plus 7 is 19.\n</think>\nThe answer is 19.": ("\n12 plus 7 is 19.\n", "\nThe answer is 19."),
    "The answer is 19.": ("", "The answer is 19."),
    "\n <think>a</think>b": ("a", "b"),
    "<think>\n\n</think>\n\n19": ("\n\n", "\n\n19"),
    "<think>cut off while reasoning, 12 + 7 = 1": ("cut off while reasoning, 12 + 7 = 1", ""),
    "<think>cut off in the tag </thi": ("cut off in the tag ", ""),
    "<thi": ("", "<thi"),
    "  ": ("", "  "),
    "<b>bold</b> answer": ("", "<b>bold</b> answer"),
    "19 </think> then <think>x</think>": ("", "19 </think> then <think>x</think>"),
    "<think>a</think>b<think>c</think>": ("a", "b<think>c</think>"),
    "<think>": ("", ""),
}


@pytest.mark.parametrize("reply", REPLIES)
def test_a_whole_reply_splits_into_reasoning_and_answer(reply):
    assert split_think(reply, final=True) == REPLIES[reply]


@pytest.mark.parametrize("reply", REPLIES)
@pytest.mark.parametrize("chunk_chars", [1, 2, 3, 5])
def test_streamed_deltas_add_up_to_the_whole_split(reply, chunk_chars):
    """Chunks of 1-5 characters (a tag spread over many tokens): deltas + the flush at the end = the whole split."""
    reasoning = answer = previous = ""
    for end in range(chunk_chars, len(reply) + chunk_chars, chunk_chars):
        r, a = think_delta(previous, reply[:end])
        reasoning, answer, previous = reasoning + r, answer + a, reply[:end]
        assert "<think>" not in reasoning and "</think>" not in reasoning
    final_reasoning, final_answer = split_think(reply, final=True)
    assert reasoning == final_reasoning
    assert answer + final_answer[len(answer) :] == final_answer  # the end flushes only what was held back
    assert final_answer[len(answer) :] in ("", reply)  # held back: only an undecided reply ("<thi", blanks)


def test_a_possible_tag_is_held_back_until_the_next_characters_decide():
    assert think_delta("", "<th") == ("", "")
    assert think_delta("<th", "<thx") == ("", "<thx")
    assert think_delta("", "<think>ab</") == ("ab", "")
    assert think_delta("<think>ab</", "<think>ab</b") == ("</b", "")
    assert think_delta("<think>ab</", "<think>ab</think>\n19") == ("", "\n19")


def test_think_closed():
    assert think_closed(" <think>x</think>") and think_closed("<think>x</think>19")
    assert not think_closed("<think>x</thi") and not think_closed("19</think>") and not think_closed("")


def test_the_nemoforge_parser_brings_its_plugin_and_others_do_not(tmp_path):
    cmd = server_command(tmp_path, port=8123, served_model_name="child", reasoning_parser=PARSER_NAME)
    assert cmd[cmd.index("--reasoning-parser") + 1] == PARSER_NAME
    assert cmd[cmd.index("--reasoning-parser-plugin") + 1] == PARSER_PLUGIN
    cmd = server_command(tmp_path, port=8123, served_model_name="child", reasoning_parser="deepseek_r1")
    assert "--reasoning-parser-plugin" not in cmd
    assert "--reasoning-parser" not in server_command(tmp_path, port=8123, served_model_name="c")


def test_validation_accepts_the_nemoforge_parser_on_a_tokenizer_without_think_tokens(tiny_llama_dir):
    """The default serve.reasoning_parser passes the check that refuses deepseek_r1 on the same tokenizer
    (tests/test_bad_input.py): vLLM imports the plugin and builds the parser (~10 s, in vLLM's interpreter)."""
    from transformers import AutoTokenizer

    from nemoforge.config import load_recipe
    from nemoforge.serving.engine import check_reasoning_parser

    assert load_recipe("smollm2-135m-demo").serve.reasoning_parser == PARSER_NAME
    assert "<think>" not in AutoTokenizer.from_pretrained(tiny_llama_dir).get_vocab()
    check_reasoning_parser(PARSER_NAME, str(tiny_llama_dir))
