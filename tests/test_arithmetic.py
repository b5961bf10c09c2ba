import json
from fractions import Fraction
from pathlib import Path

import pytest
from conftest import must_finish_within

from abel_lightning.arithmetic import MAX_DEPTH, arithmetic_consistency, evaluate

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.mark.parametrize(
    ("text", "consistency"),
    [
        ("She has 12 apples and eats some.", 1.0),  # no claim
        ("Total = 12", 1.0),  # no operator: a label, not a claim
        ("3 + 4 = 7 and 2 * 5 = 11", 0.5),
        ("Natalia sold 48/2 = <<48/2=24>>24 clips", 1.0),  # annotation and inline text count once
        ("Natalia sold 48/2 = <<48/2=25>>25 clips", 0.0),
        ("$1,200 + $300 = $1,500", 1.0),
        ("$1,200 + $300 = $1,600", 0.0),
        ("3 x 4 = 12 and 3 \u00d7 4 = 13", 0.5),
        ("(3 + 4) * 2 = 14.", 1.0),
        ("(3 + 4) * 2 = 15.", 0.0),
        ("5 - 8 = -3", 1.0),
        ("-2 * -3 = 6", 1.0),
        ("10/3 = 3.33", 1.0),  # to the decimals stated
        ("10/3 = 3.34", 0.0),
        ("10/3 = 3", 0.0),
        ("3/4 = 75% and 25% * 80 = 20", 1.0),
        ("2 * 3 = 6 + 1 = 7", 1.0),  # chain: 2*3 states no number, 6+1 = 7 holds
        ("5/0 = 0", 0.0),
        ("**3 + 4 = 8**", 0.0),
        ("2X + 3 = 7, so X = 2", 1.0),  # algebra fragments are not claims
        ("The train left at 6:00+48=6:48", 1.0),
    ],
)
def test_arithmetic_consistency(text, consistency):
    assert arithmetic_consistency(text) == pytest.approx(consistency, abs=1e-12)


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason="the shared GSM8K copy is not on this machine")
def test_gsm8k_reference_solutions_are_consistent():
    answers = [json.loads(line)["answer"] for line in GSM8K_TEST.read_text(encoding="utf-8").splitlines()]
    inconsistent = [answer for answer in answers if arithmetic_consistency(answer) < 1.0]
    # The one human slip in the test split: "$32 - $20 = $300" (meant $320 - $20).
    assert len(inconsistent) == 1 and "$32 - $20 = $300" in inconsistent[0]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("(3 + 4) * 2", (Fraction(14), 2)),
        ("$1,200 + $300", (Fraction(1500), 1)),
        ("-2 * -3", (Fraction(6), 1)),
        ("--5 + 1", (Fraction(6), 1)),
        ("18", (Fraction(18), 0)),
        ("50% * 8", (Fraction(4), 1)),
        ("5/0", (None, 1)),
        ("3 apples", None),
        ("(3 + 4", None),
        ("3 +", None),
    ],
)
def test_evaluate(expression, expected):
    assert evaluate(expression) == expected


def test_deep_nesting_is_not_an_expression_rather_than_a_recursion_error():
    assert evaluate("(" * MAX_DEPTH + "1 + 2" + ")" * MAX_DEPTH) == (Fraction(3), 1)
    assert evaluate("(" * (MAX_DEPTH + 1) + "1 + 2" + ")" * (MAX_DEPTH + 1)) is None
    assert evaluate("(" * 400 + "1" + ")" * 400) is None
    # A thousand signs are read in a loop: an even count is a plus.
    assert evaluate("-" * 100 + "3 + 4") == (Fraction(7), 1)
    assert arithmetic_consistency("-" * 1000 + "3 + 4 = 7") == 1.0
    assert arithmetic_consistency("(" * 5000 + "3 + 4 = 7") == 1.0


def test_numbers_past_the_bounds_state_no_claim():
    huge = "9" * 5000  # int("9" * 5000) raises ValueError past Python's 4,300-digit limit
    assert arithmetic_consistency(f"{huge} + 1 = 2") == 1.0
    assert arithmetic_consistency(f"1 + 1 = {huge}") == 1.0
    assert arithmetic_consistency(f"<<{huge}*{huge}={huge}>>") == 1.0
    assert arithmetic_consistency("1 + 1 = 3 and " + "+".join(["1"] * 1000) + " = 1000") == 0.0  # only the short one


def test_hostile_texts_finish():
    texts = [
        "<<12*34=408>>" * 150_000,  # 1.9 MB of annotations: once more than 30 s
        "(" * 100_000 + "1=1",
        "1+" * 50_000 + "1 = 50001",
        "= " * 100_000,
        "3 + 4 = 7 " * 20_000,
        "1" * 100_000 + " = 1 + 1",
        "0." + "1" * 100_000 + " + 1 = 2",  # 100,000 decimals
        "1" * 10**6 + " + 1 = 2",  # a million digits
        "2 * " + "9" * 5000 + " = 1",  # past int()'s 4,300 digits
    ]
    with must_finish_within(30):
        scores = [arithmetic_consistency(text) for text in texts]
    assert scores[0] == 1.0 and scores[4] == 1.0
    assert all(0.0 <= score <= 1.0 for score in scores)
