"""Final-answer extraction and comparison: the one place that decides what a model answered and whether it is right.

Answers travel as normalized number strings (``"18"``, ``"-3"``, ``"0.5"``, ``"3/4"``): commas, ``$`` and ``%`` are
dropped and an all-zero decimal part (``"18.00"``) is removed, so equal answers written alike compare equal as strings
(Regime W's majority vote relies on that); :func:`is_correct` compares numerically, so ``"3/4"`` equals ``"0.75"``.
"""

from __future__ import annotations

import re
from fractions import Fraction

# One number as people and models write it: optional sign (ASCII or Unicode minus) around an optional "$" (a space may
# follow "$" but not a sign, so "5 - 3" never reads as -3), then a thousands-grouped integer ("1,234"), a plain integer
# or decimal, or a bare decimal (".5"), optionally "/ integer".
# The lookbehind keeps digits inside words or other numbers ("x2", "5-3") from starting a match; the lookahead keeps
# "1,2345" from reading as "1,234".
_NUMBER = (
    r"(?<![\w.])[-\u2212]?(?:\$\s?)?[-\u2212]?"
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:/\d+)?"
)
_NUMBER_RE = re.compile(_NUMBER)
_GSM8K_FINAL_RE = re.compile(r"####\s*(" + _NUMBER + ")")
# "The answer is 18", "The answer is: $18.00", "the final answer is **18**", "The answer is $\boxed{18}$".
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*(?:\*\*|\$|\\\(|\\boxed\{|\s)*(" + _NUMBER + ")", re.IGNORECASE)
_BOXED = "\\boxed{"
# LaTeX that may wrap a number inside \boxed{...}; \frac{a}{b} is rewritten as a/b before these are removed.
_FRAC_RE = re.compile(r"\\d?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}")
_LATEX_NOISE_RE = re.compile(r"\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}|\\[$%!,; ]|\^\\circ|\\circ")
_ZERO_DECIMALS_RE = re.compile(r"\.0+$")
_REL_TOL = Fraction(1, 10**6)


def extract_answer(text: str) -> str | None:
    """Return the final answer of a model solution as a normalized number string, or None when it states no number.

    Rules, first that applies wins:
    1. GSM8K's ``#### N`` (last occurrence);
    2. Abel's closing line ``The answer is N`` / ``The answer is: N`` (last occurrence that is followed by a number);
    3. ``\\boxed{N}`` (last box holding a number; ``\\frac{3}{4}`` reads as ``3/4``);
    4. the last number anywhere in the text.

    Examples: ``"... The answer is 18."`` -> ``"18"``; ``"#### 1,234"`` -> ``"1234"``; ``"The answer is: $18.00"`` ->
    ``"18"``; ``"... 18%"`` -> ``"18"``; ``"\\boxed{3/4}"`` -> ``"3/4"``; ``"no idea"`` -> None; ``""`` -> None.
    """
    for pattern in (_GSM8K_FINAL_RE, _ANSWER_IS_RE):
        matches = pattern.findall(text)
        if matches:
            return _normalize(matches[-1])
    boxed = _last_boxed_number(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER_RE.findall(text)
    return _normalize(numbers[-1]) if numbers else None


def extract_gold(answer_text: str) -> str:
    """Return the reference answer of a GSM8K solution: the number after its ``#### `` line, commas removed.

    Example: ``"...\\n#### 114,200"`` -> ``"114200"``; ``"#### -10"`` -> ``"-10"``.
    Raises ValueError when the text has no ``#### N`` line (the row is not a GSM8K-format solution).
    """
    matches = _GSM8K_FINAL_RE.findall(answer_text)
    if not matches:
        tail = answer_text[-60:]
        raise ValueError(
            f"GSM8K answer has no final '#### N' line (ends with {tail!r}); every reference solution must end with "
            "'#### <number>'"
        )
    return _normalize(matches[-1])


def is_correct(pred: str | None, gold: str) -> bool:
    """Whether a predicted answer equals the gold answer as a number.

    Exact rational comparison; when either side is written as a decimal, a 1e-6 relative tolerance absorbs rounding:
    ``("18.0", "18")`` -> True; ``("3/4", "0.75")`` -> True; ``("0.3333333", "1/3")`` -> True (relative difference
    1e-7);
    ``("1000001", "1000000")`` -> False (integers are exact); ``("17", "18")`` -> False.
    A None or unreadable prediction is never correct.
    Raises ValueError when ``gold`` is not a number, since that is a data error, not a wrong answer.
    """
    if pred is None:
        return False
    gold_value = _to_fraction(gold)
    if gold_value is None:
        raise ValueError(f"gold answer {gold!r} is not a number; gold answers come from extract_gold")
    pred_value = _to_fraction(pred)
    if pred_value is None:
        return False
    if pred_value == gold_value:
        return True
    if "." not in pred + gold:
        return False
    return abs(pred_value - gold_value) <= _REL_TOL * max(abs(pred_value), abs(gold_value))


def _normalize(number: str) -> str:
    """``"$1,234.00"`` -> ``"1234"``, ``"-$5"`` -> ``"-5"``, ``".5"`` -> ``"0.5"``, ``"3/4"`` stays ``"3/4"``."""
    body = number.replace("\u2212", "-")
    negative = "-" in body
    body = body.replace("-", "").replace("$", "").replace(",", "").replace("%", "").strip()
    if "/" not in body:
        body = _ZERO_DECIMALS_RE.sub("", body)
        if body.startswith("."):
            body = "0" + body
    # "-0" is the same answer as "0"; keeping the sign would split a majority vote.
    if negative and body.strip("0./") != "":
        return "-" + body
    return body


def _to_fraction(answer: str) -> Fraction | None:
    """Parse a normalized (or lightly decorated) answer string exactly; None if it is not one number."""
    match = _NUMBER_RE.fullmatch(answer.strip().rstrip("%"))
    if match is None:
        return None
    numerator, _, denominator = _normalize(match.group(0)).partition("/")
    if denominator and int(denominator) == 0:
        return None
    value = Fraction(numerator)
    return value / int(denominator) if denominator else value


def _last_boxed_number(text: str) -> str | None:
    """The number in the last ``\\boxed{...}`` that holds one (the last number if it holds several), else None."""
    start = text.rfind(_BOXED)
    while start != -1:
        content = _braced(text, start + len(_BOXED))
        content = _LATEX_NOISE_RE.sub(" ", _FRAC_RE.sub(r"\1/\2", content))
        numbers = _NUMBER_RE.findall(content)
        if numbers:
            return _normalize(numbers[-1])
        start = text.rfind(_BOXED, 0, start)
    return None


def _braced(text: str, open_at: int) -> str:
    """Text from ``open_at`` up to the brace that closes the one just before it (or to the end when unclosed)."""
    depth = 1
    for index in range(open_at, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at:index]
    return text[open_at:]
