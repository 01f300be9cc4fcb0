"""Verifiable rewards on literal completions: accuracy, format, TRL completion formats, unscorable rows."""

from __future__ import annotations

import pytest

from nemoforge.rewards import REWARDS, accuracy_reward, answer_correct, combined_rewards, format_reward


def test_accuracy_on_literal_gsm8k_answers():
    completions = [
        "<think>\n48/2 = 24, 48+24 = 72\n</think>\nThe answer is 72.",
        "The answer is 72.0",
        "<think>\nthe answer is 72\n</think>\nThe answer is 71.",  # only the part after </think> counts
        "Total: $1,000",
        "no number here",
    ]
    answers = ["72", "72", "72", "1000", "5"]
    assert accuracy_reward(completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert accuracy_reward(["The answer is 3."], answer=[None]) == [None]
    assert accuracy_reward(["The answer is 3."], answer=["N/A"]) == [None]  # a reference that does not parse


@pytest.mark.parametrize(
    "completion",
    [
        "<think>I think the total is 4 but let me",
        "<think>\n2 + 2 = 4\nThe answer is 4.",
        "  <think>\\boxed{4}",
        "<think>a</think>The answer is 4.<think>wait, 4",  # a second block left open
        "The answer is 4. <think>hmm",
    ],
)
def test_truncated_reasoning_is_no_answer(completion):
    assert answer_correct(completion, "4") is False
    assert accuracy_reward([completion], answer=["4"]) == [0.0]


def test_closed_reasoning_keeps_its_answer():
    assert answer_correct("<think>2+2</think>The answer is 4.", "4") is True
    assert answer_correct("<think>a</think><think>b</think>4", "4") is True
    assert answer_correct("stray </think> 4", "4") is True  # no block left open


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("2 2/3", "2", 0.0),
        (r"\pm 2021", "2021", 0.0),
        ("The answer is 2021.0004", "2021", 0.0),
        ("The answer is 1{,}234", "1234", 1.0),
        ("<think>1 234 or 12?</think>\\boxed{1\\,234}", "1234", 1.0),
    ],
)
def test_accuracy_has_no_math_verify_false_positives(completion, answer, expected):
    assert accuracy_reward([completion], answer=[answer]) == [expected]


def test_format_reward_on_and_off():
    completions = [
        "<think>\nx\n</think>\n5", "5", "<think>\nx\n</think>\n5", "5", "<think> open",
        "<think>a</think>5<think>b",  # on, but a block is left open: as truncated as the accuracy rule says
    ]
    reasoning = ["on", "on", "off", "off", "on", "on"]
    assert format_reward(completions, reasoning=reasoning) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_message_list_completions_are_read_as_their_content():
    text = "<think>\n2+2=4\n</think>\nThe answer is 4."
    conversational = [
        [{"role": "assistant", "content": text}],
        [{"content": text}],  # TRL's examples leave the role out
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "The answer is 5."}],
    ]
    assert accuracy_reward(conversational, answer=["4", "4", "4"]) == [1.0, 1.0, 0.0]
    assert format_reward(conversational, reasoning=["on", "on", "on"]) == [1.0, 1.0, 0.0]
    standard = accuracy_reward([text], answer=["4"]) + format_reward([text], reasoning=["on"])
    assert standard == accuracy_reward(conversational[:1], answer=["4"]) + format_reward(
        conversational[:1], reasoning=["on"]
    )


@pytest.mark.parametrize(
    "completion",
    [
        None,
        42,
        {"role": "assistant", "content": "4"},  # a message, not a list of messages
        ["4"],
        [{"role": "user", "content": "4"}],  # no assistant message
        [{"role": "assistant", "content": [{"type": "text", "text": "4"}]}],  # content parts, not a string
        [],
    ],
)
def test_other_completions_raise_a_clear_type_error(completion):
    with pytest.raises(TypeError, match="completion must be a string or a list of message dicts"):
        accuracy_reward([completion], answer=["4"])
    with pytest.raises(TypeError, match=type(completion).__name__):
        format_reward([completion], reasoning=["on"])


def test_combined_weights_and_extra_columns_ignored():
    total, parts = combined_rewards(
        {"accuracy": 1.0, "format": 0.5},
        ["<think>\n2+2=4\n</think>\nThe answer is 4.", "The answer is 5."],
        answer=["4", "4"],
        reasoning=["on", "off"],
        category=["math", "math"],
    )
    assert total == [1.5, 0.5]
    assert parts == {"accuracy": [1.0, 0.0], "format": [1.0, 1.0]}
    assert set(REWARDS) == {"accuracy", "format"}


def test_combined_keeps_unscorable_rows_unscorable():
    total, parts = combined_rewards(
        {"accuracy": 1.0, "format": 0.5},
        ["The answer is 4.", "The answer is 4.", "The answer is 5."],
        answer=["4", None, "N/A"],
        reasoning=["off", "off", "off"],
    )
    assert total == [1.5, None, None]  # never 0.5 (format alone) nor 0
    assert parts == {"accuracy": [1.0, None, None], "format": [1.0, 1.0, 1.0]}
