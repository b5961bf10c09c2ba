"""A toy GSM8K: seeded arithmetic word problems of 1 to 3 steps, small enough for a CPU model to half-learn.

Solutions use GSM8K's own format, so every GSM8K code path (loader, answer extraction, reward) runs on them unchanged:
one line per step with a calculator annotation, then the final answer::

    Tom has 3+4=<<3+4=7>>7 apples now.
    #### 7

Every intermediate and final result is a non-negative integer below 200.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from abel_lightning.jsonl import write_jsonl_atomic

# The dataset name that serves :func:`toy_splits` at their defaults, generated on first use (no file to write first).
TOY_DATASET = "builtin:toy"

NAMES = ["Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Zoe", "Leo", "Emma"]
THINGS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "cards", "shells"]
ITEMS = ["pen", "toy car", "notebook", "ball", "cupcake", "kite"]

_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a // b,
}


def _calc(a: int, op: str, b: int) -> tuple[str, int]:
    """``a op b`` written the GSM8K way, ``a+b=<<a+b=c>>c``, and its value."""
    value = _OPS[op](a, b)
    return f"{a}{op}{b}=<<{a}{op}{b}={value}>>{value}", value


# Each template draws its numbers and returns (question, one solution line per step, answer).
Problem = tuple[str, list[str], int]


def _buys(rng: random.Random) -> Problem:
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    total, value = _calc(a, "+", b)
    question = f"{name} has {a} {things}. {name} buys {b} more. How many {things} does {name} have now?"
    return question, [f"{name} has {total} {things} now."], value


def _gives(rng: random.Random) -> Problem:
    name, friend = rng.sample(NAMES, 2)
    things = rng.choice(THINGS)
    a = rng.randint(10, 90)
    b = rng.randint(1, a)
    left, value = _calc(a, "-", b)
    question = f"{name} has {a} {things}. {name} gives {b} to {friend}. How many {things} does {name} have left?"
    return question, [f"{name} has {left} {things} left."], value


def _groups(rng: random.Random) -> Problem:
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    bags, each = rng.randint(2, 9), rng.randint(2, 12)
    total, value = _calc(bags, "*", each)
    question = f"{name} has {bags} bags with {each} {things} in each bag. How many {things} does {name} have?"
    return question, [f"{name} has {total} {things}."], value


def _shares(rng: random.Random) -> Problem:
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    friends, each = rng.randint(2, 8), rng.randint(2, 12)
    share, value = _calc(friends * each, "/", friends)
    question = (
        f"{name} shares {friends * each} {things} equally among {friends} friends. "
        f"How many {things} does each friend get?"
    )
    return question, [f"Each friend gets {share} {things}."], value


def _change(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count, price = rng.randint(2, 6), rng.randint(2, 9)
    paid = rng.choice([b for b in (20, 50, 100) if b >= count * price])
    cost, cost_value = _calc(count, "*", price)
    change, value = _calc(paid, "-", cost_value)
    question = (
        f"One {item} costs ${price}. {name} buys {count} of them and pays with a ${paid} bill. "
        f"How many dollars of change does {name} get?"
    )
    return question, [f"The {item}s cost {cost} dollars.", f"{name} gets {change} dollars of change."], value


def _loses_and_finds(rng: random.Random) -> Problem:
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(10, 80)
    lost, found = rng.randint(1, a), rng.randint(1, 40)
    after_loss, left = _calc(a, "-", lost)
    after_find, value = _calc(left, "+", found)
    question = (
        f"{name} has {a} {things}. {name} loses {lost} of them and then finds {found}. "
        f"How many {things} does {name} have now?"
    )
    lines = [f"After losing some, {name} has {after_loss} {things}.", f"{name} has {after_find} {things} now."]
    return question, lines, value


def _packs(rng: random.Random) -> Problem:
    name, friend = rng.sample(NAMES, 2)
    things = rng.choice(THINGS)
    a, packs, per_pack = rng.randint(1, 40), rng.randint(2, 6), rng.randint(2, 10)
    bought, bought_value = _calc(packs, "*", per_pack)
    total, total_value = _calc(a, "+", bought_value)
    given = rng.randint(1, total_value)
    left, value = _calc(total_value, "-", given)
    question = (
        f"{name} has {a} {things}. {name} buys {packs} packs with {per_pack} {things} in each pack, "
        f"then gives {given} {things} to {friend}. How many {things} does {name} have left?"
    )
    lines = [f"{name} buys {bought} {things}.", f"Then {name} has {total} {things}.", f"{name} has {left} left."]
    return question, lines, value


TEMPLATES = [_buys, _gives, _groups, _shares, _change, _loses_and_finds, _packs]


def make_problems(n: int, seed: int) -> list[dict]:
    """``n`` distinct problems as GSM8K rows ``{"question", "answer"}``.

    The stream is prefix-stable: the first ``k`` problems of ``make_problems(n, seed)`` are ``make_problems(k, seed)``.
    """
    rng = random.Random(seed)
    problems: dict[str, str] = {}
    while len(problems) < n:
        question, lines, value = rng.choice(TEMPLATES)(rng)
        problems.setdefault(question, "\n".join([*lines, f"#### {value}"]))
    return [{"question": q, "answer": a} for q, a in problems.items()]


def toy_splits(n_train: int = 2000, n_test: int = 200, seed: int = 0) -> dict[str, list[dict]]:
    """The ``train`` and ``test`` splits (GSM8K rows, no question in both): ``builtin:toy`` as a dataset name.

    The test split is drawn first, so it depends only on ``n_test`` and ``seed``, whatever ``n_train`` is.
    """
    problems = make_problems(n_test + n_train, seed)
    return {"train": problems[n_test:], "test": problems[:n_test]}


def write_toy_dataset(out_dir: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write :func:`toy_splits` as ``train.jsonl`` and ``test.jsonl`` and return their paths."""
    paths = {}
    for split, rows in toy_splits(n_train, n_test, seed).items():
        paths[split] = Path(out_dir) / f"{split}.jsonl"
        write_jsonl_atomic(paths[split], rows)
    return paths
