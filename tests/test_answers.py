import json
from pathlib import Path

import pytest

from abel_lightning.answers import extract_answer, extract_gold, is_correct

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"

ENDINGS = [
    # GSM8K reference style.
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("She has 1,000 + 234 = 1,234 dollars.\n#### 1,234", "1234"),
    ("The temperature fell 5 - 15 = -10 degrees.\n#### -10", "-10"),
    ("#### 114,200", "114200"),
    ("The answer is 5.\n#### 7", "7"),  # GSM8K's marker wins over prose
    # Abel's closing line.
    ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = 18 dollars every day.\nThe answer is: 18", "18"),
    ("So she makes $18 every day.\nThe answer is 18.", "18"),
    ("The answer is: $18.00", "18"),
    ("The answer is 18 dollars.", "18"),
    ("The answer is $1,234.50.", "1234.50"),
    ("The answer is 0.5", "0.5"),
    ("The answer is .5 hours.", "0.5"),
    ("He loses 3 each day, so the answer is -3.", "-3"),
    ("The answer is \u22123", "-3"),
    ("The answer is 25%.", "25"),
    ("The answer is 3/4.", "3/4"),
    ("The answer is 7.0", "7"),
    ("The final answer is **42**.", "42"),
    ("The answer is $\\boxed{64}$.", "64"),
    ("The answer is 12. Question: Tom has 5 apples and eats 2. How many are left? Let's think step by step.", "12"),
    ("The answer is 10.\nWait, I made an error: 4 * 3 = 12.\nThe answer is 12.", "12"),  # last occurrence
    ("3 + 4 = 7 apples.\nThe answer is 7 apples, which is 3 more than 4.", "7"),
    ("The answer is: 1,000,000", "1000000"),
    ("The answer is 10 - 3 = 7", "10"),  # the number right after "The answer is" is the one given
    # \boxed.
    ("So the total is $\\boxed{18}$.", "18"),
    ("Therefore the answer is \\boxed{1,234}.", "1234"),
    ("We get \\boxed{\\frac{3}{4}} of the pie.", "3/4"),
    ("First \\boxed{5}, then corrected to \\boxed{6}.", "6"),
    ("The cost is \\boxed{\\$18.00}.", "18"),
    ("Rate is \\boxed{20\\%}", "20"),
    ("Total: \\boxed{18 \\text{ dollars}}", "18"),
    ("I got 9 eggs. \\boxed{} is 12 though.", "12"),  # empty box: fall back to the last number
    # Last number in the text.
    ("She pays 3 * $6 = $18 in total.", "18"),
    ("After 5 - 3 there are 2 left", "2"),
    ("Each pie has 8 slices, so 8 * 4 = 32 slices in all.", "32"),
    ("It rose by 15%.", "15"),
    ("He owes -$5.", "-5"),
    ("A rate of 2.75 per hour.", "2.75"),
    ("On 12/25 he had 4 left over.", "4"),
    ("Numbers 1,2,3 and then 7", "7"),
    # No number at all, or a dangling closing line.
    ("", None),
    ("I don't know how to solve this.", None),
    ("The answer is", None),
    ("The answer is: ", None),
    ("The answer is \\boxed{}", None),
    ("Step 3 gives the count. The answer is unclear.", "3"),
]


@pytest.mark.parametrize(("text", "expected"), ENDINGS)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason="the shared GSM8K copy is not on this machine")
def test_extract_gold_parses_every_gsm8k_test_row():
    rows = [json.loads(line) for line in GSM8K_TEST.read_text(encoding="utf-8").splitlines()]
    golds = [extract_gold(row["answer"]) for row in rows]
    assert len(golds) == 1319
    assert all(gold.lstrip("-").isdigit() for gold in golds)
    assert golds[0] == "18"  # Janet's ducks
    # Every reference solution reads back as its own gold answer.
    assert all(extract_answer(row["answer"]) == gold for row, gold in zip(rows, golds))


def test_extract_gold_strips_thousands_separators():
    assert extract_gold("She saves 100,000 + 14,200 = <<100000+14200=114200>>114,200\n#### 114,200") == "114200"


def test_extract_gold_names_the_problem():
    with pytest.raises(ValueError, match="no final '#### N' line"):
        extract_gold("He has 18 dollars.")


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("18", "18", True),
        ("18.0", "18", True),
        ("18.00", "18", True),
        ("3/4", "0.75", True),
        ("0.75", "3/4", True),
        ("6/8", "3/4", True),
        ("-10", "-10", True),
        ("10", "-10", False),
        ("0.3333333", "1/3", True),
        ("0.33", "1/3", False),
        ("18.0000001", "18", True),
        ("1000001", "1000000", False),
        ("1234", "1,234", True),
        ("17", "18", False),
        (None, "18", False),
        ("", "18", False),
        ("abc", "18", False),
        ("3/0", "0", False),
        ("0", "0", True),
    ],
)
def test_is_correct(pred, gold, expected):
    assert is_correct(pred, gold) is expected


def test_is_correct_rejects_a_gold_that_is_no_number():
    with pytest.raises(ValueError, match="not a number"):
        is_correct("18", "eighteen")


def test_extracted_answers_compare_as_numbers():
    assert is_correct(extract_answer("The answer is: $18.00"), extract_gold("#### 18"))
    assert not is_correct(extract_answer("No idea."), "18")
