"""Final-answer extraction and comparison: the one place that decides what a model answered and whether it is right.

It is the reward in PPO and the metric in Phase 5, and what it reads is untrusted model text: every function here
runs in time linear in the text (bounded regular expressions, a bounded number of statements and boxes looked at),
and a number longer than :data:`MAX_DIGITS` digits is no answer rather than an ``int`` error.

Answers travel as canonical number strings, so that equal answers compare equal as strings (Regime W's majority vote
relies on that): integers as ``"18"``, ``"-3"``; decimals without trailing zeros (``"18.00"`` -> ``"18"``,
``"1234.50"`` -> ``"1234.5"``); fractions and mixed numbers reduced (``"6/8"`` -> ``"3/4"``, ``"2 1/2"`` -> ``"5/2"``,
``"8/4"`` -> ``"2"``). :func:`is_correct` compares numerically, so ``"3/4"`` equals ``"0.75"``.
``docs/FORMATS.md`` has the table of what is read and why; ``tests/test_answers.py`` has a case per row.

Another checker can replace this one where answers are judged (``answer_checker: math_verify``, or ``class_path`` to
your own :class:`AnswerChecker`): see :data:`ANSWER_CHECKERS`.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from fractions import Fraction

from abel_lightning.arithmetic import evaluate
from abel_lightning.registry import Registry

# A longer run of digits is no number anyone means, and int() refuses strings past 4,300 digits.
MAX_DIGITS = 100
# How far an answer statement ("The answer is ...", "#### ...") and a \boxed{...} are read, and how many of the last
# ones are looked at: a completion states its answer a few times at most, so a runaway one costs no more.
_STATEMENT_CHARS = 200
_BOX_CHARS = 300
_LAST_LOOKED_AT = 16
# Where a window into the text starts, a LaTeX command or a number may be cut: a number this close to the start is
# read from a wider window.
_WINDOW_MARGIN = 64

# --- cleaning: the ways of writing a number, rewritten to one before anything is read ---------------------------------

_MINUS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})
_VULGAR = {"\u00bd": "1/2", "\u00bc": "1/4", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_VULGAR_RE = re.compile(r"[\u00bd\u00bc\u00be\u2153\u2154]")
# "2\frac{1}{2}" is a mixed number, "-\frac{3}{4}" a negative fraction; \dfrac and \tfrac are display variants.
_FRAC_RE = re.compile(
    r"\\[dt]?frac[ \t]{0,3}\{[ \t]{0,3}(\d{1,30}(?:\.\d{1,30})?)[ \t]{0,3}\}"
    r"[ \t]{0,3}\{[ \t]{0,3}(\d{1,30}(?:\.\d{1,30})?)[ \t]{0,3}\}"
)
# Thousands separators other than ",": LaTeX "{,}" and "\,", thin and no-break spaces, apostrophes ("1'234"), when a
# digit precedes them (checked in _clean). Every pattern of the cleaning starts with a literal or a character class, so
# that re skips the rest of the text fast: a digit look-behind up front costs a test at every character.
_SEPARATOR_RE = re.compile(r"(?:\{,\}|\\[, ]|[\u2009\u202f\u00a0'\u2019])(?=\d{3}(?!\d))")
_LATEX_TEXT_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)[ \t]{0,3}\{([^{}]{0,100})\}")
_LATEX_REWRITES = [
    (re.compile(r"\\[$%]"), lambda match: match.group(0)[1]),
    (re.compile(r"\^\{?\\circ\}?|\\circ|\u00b0|\\left|\\right|\\[!;:]|\\quad"), lambda match: " "),
    (re.compile(r"\\times|\\cdot|\u00d7"), lambda match: "*"),
    (re.compile(r"(?: [xX] ?|[xX] ?)(?=\d)"), lambda match: _after_digit(match, "*")),
    (re.compile(r"\\div|\u00f7"), lambda match: "/"),
]
# A new question after the solution: a few-shot continuation or a restated problem. What follows it answers that one.
_NEXT_QUESTION_RE = re.compile(r"\n[ \t]{0,8}(?:Question|Problem|Q|Human|User)[ \t]{0,3}\d{0,3}[ \t]{0,3}:")

# --- reading: markers, boxes, numbers ---------------------------------------------------------------------------------

_GSM8K_MARK_RE = re.compile(r"####")
# "The answer is 18", "the final answer is: 18", "Final answer: 18", in any case. Spelled out as character classes:
# re.IGNORECASE with a word boundary up front scans ten times slower, which a 100 kB completion notices.
_ANSWER_IS_RE = re.compile(
    r"[aA][nN][sS][wW][eE][rR]\s{1,3}[iI][sS]\b[ \t]{0,3}:?"
    r"|[fF][iI][nN][aA][lL]\s{1,3}[aA][nN][sS][wW][eE][rR][ \t]{0,3}:"
)
# A statement ends at a line break or at sentence punctuation followed by a blank ("18.5" goes on, "18." ends).
_STATEMENT_END_RE = re.compile(r"\n|[.!?;](?=\s|$)")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)[ \t]{0,3}\{")
_BRACE_RE = re.compile(r"[{}]")
_DIGIT_RE = re.compile(r"\d")
# One number: optional sign around an optional currency symbol (a blank may follow the symbol, never a sign, so
# "5 - 3" does not read -3), then a mixed number ("2 1/2"), a grouped integer ("1,234" or Indian "1,00,000"), a plain
# integer, optionally ".decimals" and "/denominator", or a bare decimal (".5"). The look-behind keeps digits inside
# words or other numbers ("x2", "5-3", "1.5") from starting a match; the look-aheads keep "1,2345" from reading "1,234".
_GROUPED = r"\d{1,3}(?:,\d{3})+(?!\d)|\d{1,2}(?:,\d{2})+,\d{3}(?!\d)"
_NUMBER = (
    r"(?<![\w.])-?(?:[$\u20ac\u00a3\u00a5\u20b9] ?)?-?"
    rf"(?:\d+ \d+/\d+(?!\d)|(?:{_GROUPED}|\d+)(?:\.\d+)?(?:/\d+)?|\.\d+)"
)
_NUMBER_RE = re.compile(_NUMBER)
# Arithmetic from a statement's first number on: the run that may hold "12 + 6 = 18". "." and "," continue it only
# inside a number, so a sentence's or list's punctuation ends it.
_RUN_RE = re.compile(r"(?:[\d$%+\-*/()=\s]|[.,](?=\d))*")
_REL_TOL = Fraction(1, 10**6)


def extract_answer(text: str) -> str | None:
    """Return the final answer of a model solution as a canonical number string, or None when it states no number.

    The text is cut at a new question that follows the solution (``\\nQuestion:``, ``\\nQ:``, ...). Then, the first
    rule that finds a number wins:

    1. GSM8K's ``#### ...`` (the last one that holds a number);
    2. an answer statement, ``The answer is ...`` / ``Final answer: ...`` (the last one that holds a number);
    3. ``\\boxed{...}`` (the last box that holds a number);
    4. the last number of the text, questions (sentences ending in ``?``) left out.

    In rules 1-3 the answer is read from the statement or the box: its right-hand side when it is an equation
    (``The answer is 12 + 6 = 18`` -> ``"18"``), its value when it is an expression (``\\boxed{2 \\times 3}`` ->
    ``"6"``), else its first number (``The answer is 18 apples, 3 more than 15`` -> ``"18"``).

    Examples: ``"... The answer is 18."`` -> ``"18"``; ``"#### 1,234"`` -> ``"1234"``; ``"The answer is: $18.00"``
    -> ``"18"``; ``"The answer is \\frac{3}{4}."`` -> ``"3/4"``; ``"... 18%"`` -> ``"18"``; ``"no idea"`` -> None.
    """
    # Markers are found in the raw text and only what is read around them is cleaned, so a long completion costs a
    # scan for markers, not a rewrite of all of it.
    text = _cut_at_next_question(text)
    for marker in (_GSM8K_MARK_RE, _ANSWER_IS_RE):
        for match in reversed(deque(marker.finditer(text), maxlen=_LAST_LOOKED_AT)):
            answer = _statement_answer(text, match.end())
            if answer is not None:
                return answer
    boxed = _last_boxed_answer(text)
    return boxed if boxed is not None else _last_number(text)


def extract_gold(answer_text: str) -> str:
    """Return the reference answer of a GSM8K solution: the number after its last ``#### `` mark, canonical.

    Example: ``"...\\n#### 114,200"`` -> ``"114200"``; ``"#### -10"`` -> ``"-10"``.
    Raises ValueError when the text has no ``#### N`` line (the row is not a GSM8K-format solution).
    """
    for match in reversed(deque(_GSM8K_MARK_RE.finditer(answer_text), maxlen=_LAST_LOOKED_AT)):
        answer = _statement_answer(answer_text, match.end())
        if answer is not None:
            return answer
    tail = answer_text[-60:]
    raise ValueError(
        f"GSM8K answer has no final '#### N' line (ends with {tail!r}); every reference solution must end with "
        "'#### <number>'"
    )


def is_correct(pred: str | None, gold: str) -> bool:
    """Whether a predicted answer equals the gold answer as a number.

    Exact rational comparison; when either side is written as a decimal, a 1e-6 relative tolerance absorbs rounding:
    ``("18.0", "18")`` -> True; ``("3/4", "0.75")`` -> True; ``("0.3333333", "1/3")`` -> True (relative difference
    1e-7); ``("1000001", "1000000")`` -> False (integers are exact); ``("17", "18")`` -> False.
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


# --- checkers: who judges answers where a phase does ------------------------------------------------------------------


class AnswerChecker:
    """Reads a completion's final answer and judges it against a gold answer (a canonical number string).

    ``extract`` returns a string that equal answers share (Regime W votes on it) or None; ``is_correct`` must accept
    None (never correct). Subclass it, or select one by name: ``answer_checker: gsm8k`` (this module, the default) or
    ``math_verify`` (Hugging Face's math-verify).
    """

    def extract(self, completion: str) -> str | None:
        raise NotImplementedError

    def is_correct(self, answer: str | None, gold: str) -> bool:
        raise NotImplementedError

    def judge(self, completions: Sequence[str], gold: str) -> tuple[list[str | None], list[bool]]:
        """The answers of a question's ``completions`` and whether each is correct against ``gold``."""
        answers = [self.extract(completion) for completion in completions]
        return answers, [self.is_correct(answer, gold) for answer in answers]


ANSWER_CHECKERS: Registry[type[AnswerChecker]] = Registry("answer checker")


@ANSWER_CHECKERS.register("gsm8k")
class Gsm8kChecker(AnswerChecker):
    """This module's rules (:func:`extract_answer`, :func:`is_correct`): fast, numbers only."""

    def extract(self, completion: str) -> str | None:
        return extract_answer(completion)

    def is_correct(self, answer: str | None, gold: str) -> bool:
        return is_correct(answer, gold)


@ANSWER_CHECKERS.register("math_verify")
class MathVerifyChecker(AnswerChecker):
    """Hugging Face's ``math-verify`` (the checker of TRL's and verl's math rewards): parses LaTeX and plain
    expressions with sympy and compares symbolically. An optional dependency: ``pip install 'abel-lightning[math]'``.

    It differs from the default where the README's table says (percentages are read as fractions, "12 + 6 = 18"
    gives the last number of the text, not the statement's), and it is slower (milliseconds to tenths of a second a
    completion). ``timeout_seconds`` bounds one parse or comparison (math-verify's own signal-based timeout, which
    works in the main thread only; None disables it, as it must be in worker threads).
    """

    def __init__(self, timeout_seconds: int | None = 5) -> None:
        try:
            import math_verify
        except ImportError as error:
            raise ImportError(
                "answer_checker: math_verify needs the math-verify package: pip install 'abel-lightning[math]' "
                "(or pip install math-verify)"
            ) from error
        self._math_verify = math_verify
        self.timeout_seconds = timeout_seconds
        # What extract parsed, by the answer string it returned: is_correct verifies that parse, as math-verify
        # would on the completion, rather than a reparse of its string (which loses "25%" and equations).
        self._parsed: dict[str, list] = {}

    def extract(self, completion: str) -> str | None:
        parsed = self._parse(completion)
        if not parsed:
            return None
        # parse returns [sympy value, the text it was read from]; the value's string (canonical where it is a plain
        # number: sympy writes 1234.5 as "1234.50000000000") is what equal answers share and what is_correct reparses.
        value = str(parsed[0])
        match = _NUMBER_RE.fullmatch(value)
        answer = (_canonical(match.group(0)) if match else None) or value
        if len(self._parsed) >= 4096:
            self._parsed.clear()
        self._parsed[answer] = parsed
        return answer

    def is_correct(self, answer: str | None, gold: str) -> bool:
        if answer is None:
            return False
        gold_parsed = self._parse(f"${gold}$")
        answer_parsed = self._parsed.get(answer) or self._parse(f"${answer}$")
        if not gold_parsed:
            raise ValueError(f"gold answer {gold!r} is not a number; gold answers come from extract_gold")
        return bool(self._math_verify.verify(gold_parsed, answer_parsed, timeout_seconds=self.timeout_seconds))

    def _parse(self, text: str) -> list:
        return self._math_verify.parse(text, parsing_timeout=self.timeout_seconds)


# --- the rules' parts -------------------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    """One spelling for each way of writing a number: ASCII minus, "," as the only thousands separator, LaTeX
    fractions as ``a/b``, LaTeX text and spacing commands dropped, ``\\times`` as ``*``."""
    text = text.translate(_MINUS)
    # A fraction right after a digit is the fractional part of a mixed number: "2\frac{1}{2}", "2½" read "2 1/2".
    text = _VULGAR_RE.sub(lambda match: _mixed(match, _VULGAR[match.group(0)]), text)
    text = _FRAC_RE.sub(lambda match: _mixed(match, f"{match.group(1)}/{match.group(2)}"), text)
    text = _SEPARATOR_RE.sub(lambda match: _after_digit(match, ","), text)
    text = _LATEX_TEXT_RE.sub(lambda match: f" {match.group(1)} ", text)
    for pattern, replacement in _LATEX_REWRITES:
        text = pattern.sub(replacement, text)
    return text


def _follows_digit(match: re.Match) -> bool:
    return match.start() > 0 and match.string[match.start() - 1].isdigit()


def _after_digit(match: re.Match, replacement: str) -> str:
    """``replacement`` where the match follows a digit, else the match unchanged."""
    return replacement if _follows_digit(match) else match.group(0)


def _mixed(match: re.Match, fraction: str) -> str:
    """A fraction, set off by a blank from a digit before it (a mixed number's whole part)."""
    return f" {fraction}" if _follows_digit(match) else fraction


def _cut_at_next_question(text: str) -> str:
    """The text before a new question that follows some solution text."""
    match = _NEXT_QUESTION_RE.search(text)
    return text[: match.start()] if match and text[: match.start()].strip() else text


def _last_number(text: str) -> str | None:
    """The last number of ``text``, its questions (sentences ending in "?") left out: a restated question's numbers
    are not an answer. Read from the end in growing windows, so a long text costs about what its tail does."""
    if _DIGIT_RE.search(text) is None:
        return None
    size = 1024
    while True:
        start = max(0, len(text) - size)
        last = deque(_NUMBER_RE.finditer(_without_questions(_clean(text[start:]))), maxlen=1)
        # A match at the window's very beginning may be the tail of a longer number cut by the window, unless it is
        # already too long to be an answer.
        if last and (start == 0 or last[0].start() >= _WINDOW_MARGIN or len(last[0].group(0)) > MAX_DIGITS):
            return _canonical(last[0].group(0))
        if start == 0:
            return None
        size *= 4


def _without_questions(text: str) -> str:
    if "?" not in text:
        return text
    sentences = re.split(r"(?<=[!?\n])|(?<=\.)(?=\s|$)", text)
    return "".join(sentence for sentence in sentences if not sentence.rstrip().endswith("?"))


def _statement_answer(text: str, start: int) -> str | None:
    """The answer a statement starting at ``start`` gives (after "The answer is" or "####"), or None."""
    window = _clean(text[start : start + _STATEMENT_CHARS])
    end = _STATEMENT_END_RE.search(window)
    statement = window if end is None else window[: end.start()]
    box = _BOXED_RE.search(statement)
    if box is not None:
        return _answer_in(_box_content(window, box.end(), len(window)))
    return _answer_in(statement)


def _last_boxed_answer(text: str) -> str | None:
    """The answer in the last ``\\boxed{...}`` that holds a number, else None. Nested boxes read as the inner one."""
    opens = [match.end() for match in deque(_BOXED_RE.finditer(text), maxlen=_LAST_LOOKED_AT)]
    for index in reversed(range(len(opens))):
        # A box's content stops where the next box starts: that one is read on its own.
        limit = opens[index + 1] if index + 1 < len(opens) else len(text)
        answer = _answer_in(_clean(_box_content(text, opens[index], limit)))
        if answer is not None:
            return answer
    return None


def _box_content(text: str, open_at: int, limit: int) -> str:
    """Text from ``open_at`` to the brace closing the one just before it, read at most to ``limit`` and
    :data:`_BOX_CHARS` characters (an unclosed box ends there)."""
    end = min(limit, open_at + _BOX_CHARS)
    depth = 1
    for brace in _BRACE_RE.finditer(text, open_at, end):
        depth += 1 if brace.group(0) == "{" else -1
        if depth == 0:
            return text[open_at : brace.start()]
    return text[open_at:end]


def _answer_in(statement: str) -> str | None:
    """The answer a statement or box gives: the right-hand side of an equation, the value of an expression, else the
    first number. None when it holds no number."""
    first = _NUMBER_RE.search(statement)
    if first is None:
        return None
    run = _RUN_RE.match(statement, first.start()).group(0)
    if "=" in run:
        answer = _side_answer(run.rsplit("=", 1)[1])
        if answer is not None:
            return answer
    else:
        parsed = evaluate(run.rstrip("$ "))
        if parsed is not None and parsed[0] is not None and parsed[1] > 0:
            return _fraction_string(parsed[0])
    return _canonical(first.group(0))


def _side_answer(side: str) -> str | None:
    """The answer an equation's right-hand side gives: its number, or its value when it is an expression."""
    side = side.strip().rstrip(")$* ").strip()
    whole = _NUMBER_RE.fullmatch(side)
    if whole is not None:
        return _canonical(whole.group(0))
    parsed = evaluate(side)
    if parsed is not None and parsed[0] is not None and parsed[1] > 0:
        return _fraction_string(parsed[0])
    first = _NUMBER_RE.search(side)
    return None if first is None else _canonical(first.group(0))


def _canonical(number: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``, ``"-$5"`` -> ``"-5"``, ``".5"`` -> ``"0.5"``, ``"6/8"`` -> ``"3/4"``,
    ``"2 1/2"`` -> ``"5/2"``; None past :data:`MAX_DIGITS` digits or for a zero denominator."""
    value = _value(number)
    if value is None:
        return None
    if "/" in number:
        return _fraction_string(value)
    body = number.replace("-", "").lstrip("$\u20ac\u00a3\u00a5\u20b9 ").replace(",", "")
    if "." not in body:
        return str(int(value))
    whole, _, decimals = body.partition(".")
    decimals = decimals.rstrip("0")
    sign = "-" if value < 0 else ""
    return f"{sign}{int(whole or '0')}.{decimals}" if decimals else f"{sign}{int(whole or '0')}"


def _fraction_string(value: Fraction) -> str | None:
    if len(str(value)) > MAX_DIGITS:
        return None
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _value(number: str) -> Fraction | None:
    """The exact value of one number as :data:`_NUMBER_RE` matches it; None past the bounds or dividing by zero."""
    if sum(character.isdigit() for character in number) > MAX_DIGITS:
        return None
    negative = "-" in number
    body = number.replace("-", "").lstrip("$\u20ac\u00a3\u00a5\u20b9 ").replace(",", "")
    whole, _, fraction = body.rpartition(" ") if " " in body else ("", "", body)
    numerator, _, denominator = fraction.partition("/")
    if denominator and int(denominator) == 0:
        return None
    value = Fraction(numerator) / int(denominator or 1) + int(whole or 0)
    return -value if negative else value


def _to_fraction(answer: str) -> Fraction | None:
    """Parse a canonical (or lightly decorated) answer string exactly; None if it is not one number."""
    match = _NUMBER_RE.fullmatch(_clean(answer).strip().rstrip("%"))
    return None if match is None else _value(match.group(0))
