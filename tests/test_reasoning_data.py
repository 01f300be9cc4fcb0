"""The reasoning-toggle chat format, readers and SFT packing (literal inputs)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from nemoforge.data.reasoning import (
    ChatSample,
    ProblemSet,
    answer_part,
    arithmetic_problems,
    arithmetic_samples,
    encode_chat,
    format_response,
    from_signed_ids,
    gsm8k_parts,
    has_think_block,
    math_problems,
    pack_chats,
    prompt_text,
    read_chat_samples,
    read_preference_pairs,
    split_by_prompt,
    to_signed_ids,
    toggle_compliant,
    with_slips,
)
from nemoforge.errors import NemoforgeError


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_chat_template_puts_system_prompt_first_and_think_block_in_the_answer(tokenizer):
    on = ChatSample("What is 2+3?", format_response("The answer is 5.", "on", "2 + 3 = 5."), "on", "5")
    text = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "detailed thinking on"},
            {"role": "user", "content": on.prompt},
            {"role": "assistant", "content": on.response},
        ],
        tokenize=False,
    )
    assert text == (
        "<|im_start|>system\ndetailed thinking on<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2 + 3 = 5.\n</think>\nThe answer is 5.<|im_end|>\n"
    )
    assert prompt_text(tokenizer, "hi", "off").startswith("<|im_start|>system\ndetailed thinking off<|im_end|>")
    assert format_response("The answer is 5.", "off") == "The answer is 5."


def test_label_mask_covers_exactly_the_assistant_tokens(tokenizer):
    sample = ChatSample("What is 2+3?", "<think>\n2 + 3 = 5.\n</think>\nThe answer is 5.", "on", "5")
    ids, mask = encode_chat(tokenizer, sample)
    assert len(ids) == len(mask)
    masked = [t for t, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(masked) == sample.response + "<|im_end|>"
    unmasked = [t for t, m in zip(ids, mask, strict=True) if not m]
    assert tokenizer.decode(unmasked) == prompt_text(tokenizer, sample.prompt, "on")
    assert mask == sorted(mask)  # prompt first, then only assistant tokens


def test_gsm8k_reader_builds_on_off_pairs(tmp_path):
    row = {
        "question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72",
    }
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(row) + "\n")
    on, off = read_chat_samples(path)
    assert gsm8k_parts("a 1,000\n#### 1,000") == ("a 1,000", "1000")
    assert on.reasoning == "on" and off.reasoning == "off" and on.answer == off.answer == "72"
    assert on.response == (
        "<think>\nNatalia sold 48/2 = 24 clips in May.\nAltogether 48+24 = 72.\n</think>\nThe answer is 72."
    )
    assert off.response == "The answer is 72."


def test_post_training_reader(tmp_path):
    rows = [
        {"input": [{"role": "user", "content": "Hi?"}], "output": "<think>x</think>Hello", "reasoning": "on",
         "system_prompt": "detailed thinking on", "category": "chat"},
        {"input": "Sum 1+1", "output": "2", "reasoning": "off", "category": "math", "expected_answer": "2"},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = read_chat_samples(path)
    assert (a.prompt, a.reasoning, a.category, a.answer) == ("Hi?", "on", "chat", None)
    assert (b.prompt, b.reasoning, b.answer) == ("Sum 1+1", "off", "2")


def test_shared_gsm8k_and_preference_files(shared_dir):
    samples = read_chat_samples(shared_dir / "data/gsm8k/train.jsonl", limit=10)
    assert len(samples) == 10 and {s.reasoning for s in samples} == {"on", "off"}
    assert samples[0].answer == "72"
    pairs = read_preference_pairs(shared_dir / "data/instruct/llms_from_scratch_preference_data.jsonl", limit=3)
    assert pairs[0][0].startswith("Evaluate the following phrase") and pairs[0][0].endswith("freind --> friend")


def test_generated_arithmetic_is_paired_and_correct():
    samples = arithmetic_samples(40, seed=0, num_steps=2, max_operand=12)
    assert len(samples) == 40
    for on, off in zip(samples[::2], samples[1::2], strict=True):
        assert on.prompt == off.prompt and on.answer == off.answer
        assert toggle_compliant(on.response, "on") and toggle_compliant(off.response, "off")
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", on.response)
        assert steps and all(eval(f"{a} {op} {b}") == int(c) for a, op, b, c in steps)
        assert steps[-1][3] == on.answer
    train, held = split_by_prompt(samples, heldout_fraction=0.25, seed=0)
    assert not {s.prompt for s in train} & {s.prompt for s in held}


@pytest.mark.parametrize(("num_steps", "max_operand"), [(1, 9), (2, 20), (4, 60)])
def test_generated_arithmetic_difficulty_knobs(num_steps: int, max_operand: int):
    problems = arithmetic_problems(50, seed=1, num_steps=num_steps, max_operand=max_operand)
    assert len({q for q, _, _ in problems}) == 50
    for question, thinking, answer in problems:
        steps = re.findall(r"(\d+) ([-+]) (\d+) = (\d+)", thinking)
        assert len(steps) == num_steps and steps[-1][3] == answer
        assert all(eval(f"{a} {op} {b}") == int(c) >= 0 for a, op, b, c in steps)
        numbers = [int(n) for n in re.findall(r"\d+", question)]
        assert len(numbers) == num_steps + 1 and all(1 <= n <= max_operand for n in numbers)
    with pytest.raises(NemoforgeError, match="distinct problems"):
        arithmetic_problems(3000, seed=0, num_steps=1, max_operand=2)

def test_terse_traces_are_one_correct_expression_and_leave_the_problems_unchanged():
    plain = arithmetic_problems(400, seed=3, num_steps=3, max_operand=20)
    mixed = arithmetic_problems(400, seed=3, num_steps=3, max_operand=20, terse_fraction=0.7)
    assert [(q, a) for q, _, a in mixed] == [(q, a) for q, _, a in plain]
    terse = [(t, a) for (_, t, a), (_, full, _) in zip(mixed, plain, strict=True) if t != full]
    assert 0.63 < len(terse) / 400 < 0.77
    for thinking, answer in terse:
        start_line, expression = thinking.split("\n")
        lhs, rhs = expression.rstrip(".").split(" = ")
        assert re.fullmatch(r"\d+( [-+] \d+){3}", lhs) and eval(lhs) == int(rhs) == int(answer)
        assert start_line.split()[3] == lhs.split()[0]


def test_slipped_traces_carry_on_from_the_wrong_count_and_keep_the_true_answer():
    plain = arithmetic_samples(800, seed=3, num_steps=3, max_operand=20)
    slipped = arithmetic_samples(800, seed=3, num_steps=3, max_operand=20, slip_rate=0.15)
    assert [(s.prompt, s.reasoning, s.answer) for s in slipped] == [(s.prompt, s.reasoning, s.answer) for s in plain]
    assert [s.response for s in slipped if s.reasoning == "off"] == [s.response for s in plain if s.reasoning == "off"]
    lines = wrong = ends_wrong = 0
    for sample in (s for s in slipped if s.reasoning == "on"):
        steps = re.findall(r"^(-?\d+(?: [-+] \d+)+) = (-?\d+)\.$", sample.response, re.M)  # a slip can go below 0
        count = None
        for lhs, result in steps:  # each line starts from the count the previous one stated
            assert count is None or int(lhs.split()[0]) == count
            lines, wrong, count = lines + 1, wrong + (eval(lhs) != int(result)), int(result)
        assert sample.response.endswith(f"The answer is {count}.")
        ends_wrong += str(count) != sample.answer
    assert lines == 3 * 400 and 0.12 < wrong / lines < 0.18  # slip_rate 0.15 per line
    assert 0.30 < ends_wrong / 400 < 0.45  # 1 - 0.85**3 = 0.39 (a later slip can cancel an earlier one)


def test_with_slips_refuses_a_trace_without_an_operation():
    import random

    with pytest.raises(ValueError, match="no 'a \\+ b = c.' line"):
        with_slips("Ann starts with 3 apples.", random.Random(0), 0.5)


def test_toggle_rule():
    assert toggle_compliant("<think>\nx\n</think>\nok", "on")
    assert not toggle_compliant("<think> never closed", "on")
    assert not toggle_compliant("no thinking", "on")
    assert toggle_compliant("The answer is 5.", "off")
    assert not toggle_compliant("<think></think>The answer is 5.", "off")
    assert not toggle_compliant("<think>a</think>5<think>b", "on")  # a block left open: truncated
    assert not has_think_block("<think>a</think>5<think>b") and has_think_block("  <think>a</think>5")


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("<think>I think the total is 4 but let me", None),
        ("<think>a</think>The answer is 4.<think>wait", None),
        ("The answer is 4. <think>", None),
        ("<think>2+2=4</think>The answer is 4.", "The answer is 4."),
        ("<think>a</think>x<think>b</think>y", "y"),
        ("The answer is 4.", "The answer is 4."),
        ("", ""),
    ],
)
def test_answer_part_is_none_when_a_think_block_is_left_open(text, part):
    assert answer_part(text) == part


def test_math_problems_drop_and_count_unparseable_references(caplog):
    samples = [
        ChatSample("q1", "r", "on", "72"),
        ChatSample("q1", "r", "off", "72"),  # the same prompt, once
        ChatSample("q2", "r", "off", "N/A"),
        ChatSample("q3", "r", "off", None),  # no reference: not a math problem, not counted
        ChatSample("q4", "r", "off", "yes"),
        ChatSample("q5", "r", "off", "1,234"),
        ChatSample("q6", "r", "off", r"\frac{\sqrt{3}}{2}"),
    ]
    got = math_problems(samples)
    assert got == ProblemSet([("q1", "72"), ("q5", "1,234"), ("q6", r"\frac{\sqrt{3}}{2}")], num_unparseable=2)
    assert "dropped 2 of 5 math problems" in caplog.text


def test_chat_rows_hold_one_chat_each_and_signed_ids_round_trip():
    encoded = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6, 7, 8, 9], [0, 0, 1, 1])]
    ids_NT, mask_NT = pack_chats(encoded, seq_len_tokens=5, pad_token_id=0, seed=0)
    assert ids_NT.shape == mask_NT.shape == (3, 4)  # one chat per row, as wide as the longest chat
    rows = sorted((r.tolist(), m.tolist()) for r, m in zip(ids_NT, mask_NT, strict=True))
    assert rows == [([1, 2, 3, 0], [0, 1, 1, 0]), ([4, 5, 0, 0], [0, 1, 0, 0]), ([6, 7, 8, 9], [0, 0, 1, 1])]
    assert pack_chats(encoded, seq_len_tokens=3, pad_token_id=0, seed=0)[0].shape == (3, 3)  # cut to seq_len
    back_ids, back_mask = from_signed_ids(to_signed_ids(ids_NT, mask_NT))
    assert torch.equal(back_ids, ids_NT) and torch.equal(back_mask, mask_NT)
