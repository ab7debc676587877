"""Rule-based reward functions used by test_scoring.py through ``FunctionReward("tests.rollout.rule_rewards:...")``."""

from __future__ import annotations

import math

NOT_A_FUNCTION = 3


def count_token(prompts: list[str], responses: list[str]) -> list[float]:
    """The number of times the word "good" occurs in each response."""
    return [float(r.split().count("good")) for r in responses]


def response_length(prompts: list[str], responses: list[str]) -> list[int]:
    """The number of characters of each response (ints are accepted as numbers)."""
    return [len(r) for r in responses]


def one_too_few(prompts: list[str], responses: list[str]) -> list[float]:
    return [1.0] * (len(responses) - 1)


def nan_in_second_row(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0, math.nan] + [0.0] * (len(responses) - 2)


def text_in_first_row(prompts: list[str], responses: list[str]) -> list[object]:
    return ["high"] + [0.0] * (len(responses) - 1)
