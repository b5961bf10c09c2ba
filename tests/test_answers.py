import json
import re
from pathlib import Path

import pytest
from conftest import must_finish_within

from abel_lightning.answers import (
    ANSWER_CHECKERS,
    AnswerChecker,
    Gsm8kChecker,
    extract_answer,
    extract_gold,
    is_correct,
)

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_FILES = ["gsm8k/train.jsonl", "gsm8k/test.jsonl", "gsm8k_platinum/test.jsonl"]

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
    ("The answer is $1,234.50.", "1234.5"),
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
    ("The answer is 10 - 3 = 7", "7"),  # an equation: its right-hand side
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


def formats_md_table() -> list[tuple[str, str | None]]:
    """The rows of docs/FORMATS.md's table of what the checker reads: (written, read as), "no answer" as None."""
    text = (ROOT / "docs" / "FORMATS.md").read_text(encoding="utf-8")
    section = text.split("## Final answers: what the checker reads", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(.*)` \| (?:`(.*)`|no answer) \| .* \|$", section, re.MULTILINE)
    return [(written.replace("\u23ce", "\n"), read or None) for written, read in rows]


def test_the_table_in_formats_md():
    table = formats_md_table()
    assert len(table) >= 45
    wrong = [
        (written, expected, extract_answer(written))
        for written, expected in table
        if extract_answer(written) != expected
    ]
    assert not wrong


def test_every_reference_solution_reads_back_as_its_gold_answer(shared_data):
    paths = [shared_data / name for name in REFERENCE_FILES]
    rows = [json.loads(line) for path in paths for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 7473 + 1319 + 1209
    golds = [extract_gold(row["answer"]) for row in rows]
    assert all(gold.lstrip("-").isdigit() for gold in golds)
    assert [extract_answer(row["answer"]) for row in rows] == golds


HOSTILE = {
    "5,000 digits": "The answer is " + "9" * 5000,
    "a million digits": "1" * 10**6,
    "100,000 decimals": "The answer is 0." + "3" * 100_000,
    "100 kB of digits and operators": "1+2*3-4/5=" * 10_000,
    "100 kB of unclosed boxes": "\\boxed{" * 14_000,
    "nested boxes": "\\boxed{" * 5_000 + "18" + "}" * 5_000,
    "statements without numbers": "The answer is " * 8_000,
    "unary minus": "-" * 100_000 + "5",
    "parentheses": "(" * 100_000 + "3 + 4 = 7",
    "fractions": "\\frac{" * 20_000,
    "currency": "$" * 100_000,
    "separators": "1'" * 50_000,
    "questions": "How many? " * 10_000,
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_text_ends_in_a_defined_answer(name):
    with must_finish_within(10):
        for _ in range(20):
            answer = extract_answer(HOSTILE[name])
    assert answer is None or len(answer) <= 205
    assert is_correct(answer, "18") in (True, False)


def test_hostile_defined_results():
    assert extract_answer(HOSTILE["5,000 digits"]) is None  # over 100 digits: no answer, no int() error
    assert extract_answer(HOSTILE["a million digits"]) is None
    assert extract_answer(HOSTILE["nested boxes"]) == "18"
    assert extract_answer(HOSTILE["unary minus"]) == "-5"
    assert extract_answer(HOSTILE["parentheses"]) == "7"
    assert not is_correct("9" * 5000, "18")  # a 5,000-digit prediction is simply wrong


def test_checkers_are_selectable_by_name_and_by_class():
    assert {"gsm8k", "math_verify"} <= set(ANSWER_CHECKERS.names())
    checker = ANSWER_CHECKERS.resolve("gsm8k")
    assert isinstance(checker, Gsm8kChecker)
    assert checker.extract("So the answer is 12 + 6 = 18.") == "18" and checker.is_correct("18", "18")

    class Strict(AnswerChecker):  # a researcher's own: only "#### N" counts
        def extract(self, completion):
            return completion.rpartition("#### ")[2].strip() or None

        def is_correct(self, answer, gold):
            return answer == gold

    assert ANSWER_CHECKERS.resolve(Strict()).extract("blah\n#### 7") == "7"
    with pytest.raises(ValueError, match="gsm8k"):
        ANSWER_CHECKERS.resolve("sympy")


# Where math-verify and the default disagree, as the README states; both agree on every other row of the table.
# Keys: the table's text; values: what math-verify reads there (the default reads the table's answer).
MATH_VERIFY_DIFFERS = {
    "The answer is 5.\n#### 7": "5",  # no "####" rule: the first statement wins
    "The answer is 2 1/2 hours.": "1",  # no mixed numbers
    "The answer is 2\\frac{1}{2} cups.": "1/2",
    "She needs 2\u00bd cups.": "2",
    "The answer is \u22123.": None,  # no Unicode minus
    "He owes -$5.": None,
    "The answer is 1\u2009234.": "1",  # comma thousands separators only
    "The answer is 1'234.": "1",
    "The answer is 1{,}234.": "1",
    "The answer is 1\\,234.": "1",
    "The answer is 1,00,000.": "1",
    "First \\boxed{5}, then corrected to \\boxed{6}.": "{5, 6}",  # every box, as a set
    "He has 18 apples. How many will he have after buying 3 more?": "3",  # no question filter
    "The answer is 18.\nQuestion: Tom has 5 apples and buys 3.\nThe answer is 8.": "8",  # no cut at a new question
}


def test_math_verify_against_the_default_over_the_table():
    pytest.importorskip("math_verify")
    mine, theirs = ANSWER_CHECKERS.resolve("gsm8k"), ANSWER_CHECKERS.resolve("math_verify")
    differ = {}
    for written, expected in formats_md_table():
        gold = expected or "18"
        if theirs.is_correct(theirs.extract(written), gold) != mine.is_correct(mine.extract(written), gold):
            differ[written] = theirs.extract(written)
    assert differ == MATH_VERIFY_DIFFERS


def test_extract_gold_parses_every_gsm8k_test_row(shared_data):
    rows = [json.loads(line) for line in (shared_data / "gsm8k/test.jsonl").read_text(encoding="utf-8").splitlines()]
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


class LastToken(AnswerChecker):
    """A researcher's checker for the wiring test: the last whitespace-separated token, compared as a string."""

    def extract(self, completion):
        return completion.split()[-1] if completion.split() else None

    def is_correct(self, answer, gold):
        return answer == gold


def test_every_place_that_judges_answers_takes_the_selected_checker():
    from abel_lightning.callbacks.platinum_eval import PlatinumEval
    from abel_lightning.callbacks.regime_w import RegimeWCollector
    from abel_lightning.models.generation import Answered, Completion
    from abel_lightning.rewards import REWARDS, Correctness, RegimeW

    texts = ["The answer is 18. ok", "The answer is 18."]
    # The default reads 18 from both; the researcher's checker reads the last token ("ok" is wrong, "18." is not 18).
    assert REWARDS.resolve("correctness")("Q", texts, [5, 4], "18") == [1.0, 1.0]
    assert Correctness(LastToken())("Q", texts, [5, 4], "18") == [0.0, 0.0]
    assert Correctness(LastToken())("Q", ["so 18"], [2], "18") == [1.0]
    assert RegimeW(answer_checker=LastToken())("Q", ["so 18", "so 17"], [2, 2], "18")[0] > 0.9
    question = {"question_id": "q", "question": "Q", "prompt": "P", "gold_answer": "18"}
    answered = Answered(
        question,
        [Completion([1], [2, 3], text, True) for text in ["so 18", "it is 18 ok"]],
        [0, 0],
        ["a", "a"],
        [0.7, 0.7],
    )
    record = RegimeWCollector(answer_checker=LastToken()).to_records([answered])[0]
    assert [t["answer"] for t in record["trajectories"]] == ["18", "ok"]
    assert [t["correct"] for t in record["trajectories"]] == [True, False]
    one = Answered(question, answered.completions[1:], [0], ["a"], [0.0])
    assert PlatinumEval(answer_checker="gsm8k").to_records([one])[0]["correct"]
    assert not PlatinumEval(answer_checker=LastToken()).to_records([one])[0]["correct"]
