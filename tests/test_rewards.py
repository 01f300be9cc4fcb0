"""Verifiable rewards on literal completions (math-verify accuracy, think-format on/off)."""

from __future__ import annotations

from nemoforge.rewards import REWARDS, accuracy_reward, combined_rewards, format_reward


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


def test_format_reward_on_and_off():
    completions = ["<think>\nx\n</think>\n5", "5", "<think>\nx\n</think>\n5", "5", "<think> open"]
    reasoning = ["on", "on", "off", "off", "on"]
    assert format_reward(completions, reasoning=reasoning) == [1.0, 0.0, 0.0, 1.0, 0.0]


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
