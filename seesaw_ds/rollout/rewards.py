"""A verifiable toy task for RL on a small model: two-number addition, scored by a Python function.

The prompt asks for the sum and nothing else; the reward is 1 for the right number (the first integer in
the completion) plus `format_bonus` when the completion is only that number. A 135M instruct model is
right on small sums often enough for group-relative advantages to have signal, and its habit of
answering in full sentences gives the format part an early, steep rise.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int


def addition_problems(count: int, max_operand: int, rng: random.Random) -> list[Problem]:
    out = []
    for _ in range(count):
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        out.append(Problem(f"What is {a} + {b}? Reply with only the number.", a + b))
    return out


def addition_reward(completion: str, answer: int, format_bonus: float = 0.5) -> float:
    """1 if the first integer in `completion` is `answer`, plus `format_bonus` if it is all there is."""
    text = completion.strip().rstrip(".")
    match = _INT.search(text.replace(",", ""))
    if match is None or int(match.group()) != answer:
        return 0.0
    return 1.0 + (format_bonus if text == match.group() else 0.0)


TASKS = {"addition": (addition_problems, addition_reward)}
