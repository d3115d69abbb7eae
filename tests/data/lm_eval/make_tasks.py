"""Writes the two local lm-eval tasks' data (run from the repository root):

    python tests/data/lm_eval/make_tasks.py

Every item is built here from the small fact tables below, written for this
project and dedicated to the public domain (CC0 1.0); the facts themselves
(capitals, calendar order, arithmetic, antonyms, names of young animals) are
common knowledge. See SOURCE.md.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

CAPITALS = [
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Russia", "Moscow"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Cuba", "Havana"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Thailand", "Bangkok"),
    ("Denmark", "Copenhagen"),
    ("Hungary", "Budapest"),
    ("Belgium", "Brussels"),
    ("Argentina", "Buenos Aires"),
    ("England", "London"),
    ("Turkey", "Ankara"),
]
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("open", "closed"),
    ("early", "late"),
    ("full", "empty"),
    ("hard", "soft"),
    ("high", "low"),
    ("old", "young"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("thick", "thin"),
    ("long", "short"),
    ("left", "right"),
    ("day", "night"),
]
YOUNG = [
    ("dog", "puppy"),
    ("cat", "kitten"),
    ("cow", "calf"),
    ("horse", "foal"),
    ("sheep", "lamb"),
    ("goat", "kid"),
    ("duck", "duckling"),
    ("frog", "tadpole"),
    ("bear", "cub"),
    ("swan", "cygnet"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
NUMBERS = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
    "twenty-one",
]


def others(pool: list[str], right: str, i: int, n: int = 3) -> list[str]:
    """n wrong options from pool, picked by rotation (deterministic)."""
    rest = [p for p in pool if p != right]
    return [rest[(i * 7 + k * 5) % len(rest)] for k in range(n)]


def with_answer(right: str, wrong: list[str], i: int) -> tuple[list[str], int]:
    """The choices with the right one at position i % 4."""
    choices = list(dict.fromkeys(wrong))[:3]
    at = i % (len(choices) + 1)
    choices.insert(at, right)
    return choices, at


def multiple_choice() -> list[dict]:
    items: list[dict] = []
    cities = [c for _, c in CAPITALS]
    for i, (country, city) in enumerate(CAPITALS):
        choices, at = with_answer(city, others(cities, city, i), i)
        items.append(
            {
                "question": f"What is the capital of {country}?",
                "choices": choices,
                "answer": at,
            }
        )
    words = [o for _, o in OPPOSITES]
    for i, (word, opp) in enumerate(OPPOSITES):
        choices, at = with_answer(opp, others(words, opp, i), i)
        items.append(
            {
                "question": f"What is the opposite of {word}?",
                "choices": choices,
                "answer": at,
            }
        )
    young = [y for _, y in YOUNG]
    for i, (animal, baby) in enumerate(YOUNG):
        choices, at = with_answer(baby, others(young, baby, i), i)
        items.append(
            {
                "question": f"What is a young {animal} called?",
                "choices": choices,
                "answer": at,
            }
        )
    for i in range(40):
        a, b = 2 + (i * 7) % 19, 1 + (i * 5) % 13
        right = a + b
        wrong = [str(right + d) for d in (1, -1, 10) if right + d > 0]
        choices, at = with_answer(str(right), wrong, i)
        items.append(
            {"question": f"What is {a} plus {b}?", "choices": choices, "answer": at}
        )
    return items


def generation() -> list[dict]:
    items: list[dict] = []
    for i, day in enumerate(DAYS):
        items.append({"prompt": f"The day after {day} is", "target": DAYS[(i + 1) % 7]})
    for i, month in enumerate(MONTHS):
        items.append(
            {"prompt": f"The month after {month} is", "target": MONTHS[(i + 1) % 12]}
        )
    for i, word in enumerate(NUMBERS[:-1]):
        items.append(
            {"prompt": f"The number after {word} is", "target": NUMBERS[i + 1]}
        )
    for country, city in CAPITALS:
        items.append({"prompt": f"The capital of {country} is", "target": city})
    for word, opp in OPPOSITES:
        items.append({"prompt": f"The opposite of {word} is", "target": opp})
    for animal, baby in YOUNG:
        items.append({"prompt": f"A young {animal} is called a", "target": baby})
    return items


def write(name: str, items: list[dict]) -> None:
    with open(HERE / name, "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")


if __name__ == "__main__":
    write("mc.jsonl", multiple_choice())
    write("gen.jsonl", generation())
