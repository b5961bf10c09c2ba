"""Arithmetic in model text: the claims ``expression = number`` a solution makes, whether they recompute, and a small
exact evaluator for ``+ - * /``, parentheses and unary signs.

Model text is untrusted input. Everything here runs in time linear in the text and in bounded memory and stack,
whatever it contains: an expression deeper than :data:`MAX_DEPTH` parentheses, longer than :data:`MAX_TOKENS`
tokens, or holding a number longer than :data:`MAX_NUMBER_CHARS` characters is "not an expression" (no claim
is checked), never a RecursionError, a 4,300-digit ``int`` error or a minutes-long multiplication.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from itertools import islice

# Bounds for untrusted text. Nobody writes a worked step nested 32 deep, with 256 terms, or with a 60-character number;
# within them the exact arithmetic of one claim costs microseconds. A solution of 512 tokens makes at most about a
# hundred claims; past MAX_CLAIMS a text is scored on its first ones, so one runaway completion costs milliseconds.
MAX_DEPTH = 32
MAX_TOKENS = 256
MAX_NUMBER_CHARS = 60
MAX_CLAIMS = 1024

# GSM8K's calculator annotations, "<<48/2=24>>".
_ANNOTATION_RE = re.compile(r"<<([^<>]*)>>")
# Multiplication signs that are not "*": "×", LaTeX, and a letter x between two numbers ("3 x 4").
_TIMES_RE = re.compile(r"\\times|\\cdot|(?<=[\d)%])\s*[xX\u00d7]\s*(?=[\d($.])")
# A period or comma followed by a space ends a sentence or a list item, never a number ("$5, 3 + 4 = 7").
_PUNCTUATION_RE = re.compile(r"[.,](?=\s|$)")
# Maximal runs of arithmetic characters; letters, newlines, colons etc. end a run.
_MATH_RUN_RE = re.compile(r"[0-9.,$%+\-*/()= \t]+")
_NUMBER_RE = re.compile(r"\$?(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)%?")
_STATED_RE = re.compile(r"-?" + _NUMBER_RE.pattern)
_TOKEN_RE = re.compile(r"\s*(?:(" + _NUMBER_RE.pattern + r")|([-+*/()]))")
_REL_TOL = Fraction(1, 10**6)


@dataclass(frozen=True)
class _Claim:
    """``expression = stated`` as written, e.g. ``_Claim("$1,200 + $300", "$1,500")``."""

    expression: str
    stated: str


def arithmetic_consistency(text: str) -> float:
    """Fraction of the arithmetic claims in ``text`` whose left side recomputes to the stated number (1.0 if none).

    A claim is ``expression = number`` where the expression has at least one binary operator (``+ - * / x ×``,
    parentheses, unary minus; numbers may carry ``$``, ``,`` thousands separators and ``%`` meaning /100), inline or
    in a GSM8K annotation ``<<expr=number>>``. A value matches to 1e-6 relative, or to the decimals stated
    (``10/3 = 3.33`` passes, ``10/3 = 3.3`` passes, ``10/3 = 3`` fails); a stated percentage may be read either way
    (``3/4 = 75%``). Examples: ``"3 + 4 = 7 and 2 * 5 = 11"`` -> 0.5; ``"She has 12 apples."`` -> 1.0.
    Expressions are evaluated by :func:`evaluate` over exact fractions, never by Python ``eval``. Only the first
    :data:`MAX_CLAIMS` claims are checked.
    """
    verdicts = [verdict for verdict in map(_claim_holds, islice(_claims(text), MAX_CLAIMS)) if verdict is not None]
    return sum(verdicts) / len(verdicts) if verdicts else 1.0


def evaluate(expression: str) -> tuple[Fraction | None, int] | None:
    """``(value, number of binary operators)`` of an arithmetic expression, exactly; value None after a division by
    zero; None when ``expression`` is not one (other characters, unbalanced, or past the bounds above).

    ``%`` after a number divides it by 100, as a calculator does. Examples: ``"(3 + 4) * 2"`` -> ``(14, 2)``;
    ``"$1,200 + $300"`` -> ``(1500, 1)``; ``"-2 * -3"`` -> ``(6, 1)``; ``"18"`` -> ``(18, 0)``; ``"5/0"`` ->
    ``(None, 1)``; ``"3 apples"`` -> None.
    """
    tokens = _tokenize(expression.rstrip())
    return None if tokens is None else _Parser(tokens).parse()


def _claims(text: str) -> Iterator[_Claim]:
    """Every ``expression = number`` pair in ``text``, annotations first, lazily (the caller stops early)."""
    for annotation in _ANNOTATION_RE.finditer(text):
        yield from _chain_claims(annotation.group(1).split("="), first_is_whole=True, last_is_whole=True)
    # An annotation repeats the inline arithmetic next to it ("48/2 = <<48/2=24>>24"); cutting it out with a line break
    # leaves "48/2 = " and "24" in separate runs so the claim is counted once.
    prose = _ANNOTATION_RE.sub("\n", text)
    # Unicode minus and the en dash GSM8K writers use as minus; "**" is Markdown bold here, not a power.
    prose = prose.replace("\u2212", "-").replace("\u2013", "-").replace("\u00f7", "/").replace("\\div", "/")
    prose = prose.replace("**", " ")
    prose = _PUNCTUATION_RE.sub("\n", _TIMES_RE.sub("*", prose))
    for run in _MATH_RUN_RE.finditer(prose):
        body = run.group(0)
        if "=" not in body:
            continue
        # A run is maximal and holds blanks, so the character before it is the last non-blank one before the run.
        before = prose[run.start() - 1] if run.start() > 0 else ""
        after = prose[run.end() : run.end() + 1]
        # Algebra with letters ("2X + 3 = 7", "100 = 5A") splits into runs at the letters; a run that continues a
        # term of such an expression, or ends inside one, would yield a claim about a fragment.
        continues_term = (before.isalnum() or before in (")", "]")) and body.lstrip()[:1] in "+-*/)"
        glued_left = _glues(before) and not body[:1].isspace()
        glued_right = _glues(after) and not body[-1:].isspace()
        first_is_whole = not (continues_term or glued_left)
        yield from _chain_claims(body.split("="), first_is_whole, last_is_whole=not glued_right)


def _glues(character: str) -> bool:
    """Whether a character touching a number makes it part of something else: "5A", "6:48"."""
    return character.isalnum() or character == ":"


def _chain_claims(sides: list[str], first_is_whole: bool, last_is_whole: bool) -> list[_Claim]:
    """Claims of a chain ``a = b = c``: each side that is a single number is claimed for the side before it.

    A side that is itself an expression (``2*3 = 6 + 1 = 7``) states no number for its left neighbour. The first or last
    side is left out when it is only a fragment of a longer expression in the text.
    """
    claims = []
    last = len(sides) - 1
    for index, (left, right) in enumerate(zip(sides, sides[1:])):
        if (index == 0 and not first_is_whole) or (index + 1 == last and not last_is_whole):
            continue
        stated = right.strip().rstrip(")").strip()
        if len(stated) <= MAX_NUMBER_CHARS and _STATED_RE.fullmatch(stated):
            claims.append(_Claim(_trim_expression(left), stated))
    return claims


def _trim_expression(left: str) -> str:
    """Drop opening parentheses that the claim sits inside ("(2 * 3 = 6)") and stray list markers ("* 2 + 3")."""
    expression = left.strip().lstrip("*+ \t")
    # One count, then strip: recounting after each parenthesis would be quadratic in a run of thousands of them.
    unclosed = expression.count("(") - expression.count(")")
    start = 0
    while unclosed > 0 and start < len(expression) and expression[start] == "(":
        start += 1
        unclosed -= 1
        while start < len(expression) and expression[start].isspace():
            start += 1
    return expression[start:]


def _claim_holds(claim: _Claim) -> bool | None:
    """True/False for a checkable claim; None when the left side is no expression (a bare number, unparseable)."""
    parsed = evaluate(claim.expression)
    if parsed is None:
        return None
    value, operators = parsed
    if operators == 0:
        return None
    if value is None:
        # Division by zero: the stated number cannot be the value of an undefined expression.
        return False
    stated = claim.stated
    number = _number_value(stated.lstrip("-"))
    if stated.startswith("-"):
        number = -number
    candidates = [number / 100, number] if stated.endswith("%") else [number]
    decimals = len(stated.rstrip("%").partition(".")[2])
    return any(_matches(value, candidate, decimals) for candidate in candidates)


def _matches(value: Fraction, stated: Fraction, decimals: int) -> bool:
    """Equal to 1e-6 relative, or equal after rounding ``value`` to the ``decimals`` the writer used."""
    if abs(value - stated) <= _REL_TOL * max(abs(value), abs(stated)):
        return True
    return decimals > 0 and abs(value - stated) <= Fraction(1, 2 * 10**decimals)


def _number_value(token: str) -> Fraction:
    """``"$1,234.50"`` -> 1234.5, ``"15%"`` -> 15 (the caller decides what a percent means)."""
    return Fraction(token.replace("$", "").replace(",", "").rstrip("%"))


def _tokenize(source: str) -> list[str] | None:
    """Numbers and operator characters; None when anything else occurs or a bound is passed."""
    tokens = []
    position = 0
    while position < len(source):
        match = _TOKEN_RE.match(source, position)
        if match is None or len(tokens) == MAX_TOKENS:
            return None
        number, operator = match.groups()
        if number is not None and len(number) > MAX_NUMBER_CHARS:
            return None
        tokens.append(number or operator)
        position = match.end()
    return tokens


class _Parser:
    """Recursive descent over ``+ - * /``, parentheses and unary signs, in exact fractions.

    Grammar: ``expr := term (("+"|"-") term)*``, ``term := unary (("*"|"/") unary)*``,
    ``unary := ("-"|"+")* ( "(" expr ")" | number )``; a number's ``%`` divides it by 100. Signs are read in a loop
    and parentheses past :data:`MAX_DEPTH` end the parse, so the stack stays shallow whatever the text.
    """

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.position = 0
        self.operators = 0
        self.depth = 0
        self.divided_by_zero = False

    def parse(self) -> tuple[Fraction | None, int] | None:
        value = self._expression()
        if value is None or self.position != len(self.tokens):
            return None
        return (None if self.divided_by_zero else value), self.operators

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _expression(self) -> Fraction | None:
        value = self._term()
        while value is not None and self._peek() in ("+", "-"):
            operator = self.tokens[self.position]
            self.position += 1
            self.operators += 1
            right = self._term()
            if right is None:
                return None
            value = value + right if operator == "+" else value - right
        return value

    def _term(self) -> Fraction | None:
        value = self._unary()
        while value is not None and self._peek() in ("*", "/"):
            operator = self.tokens[self.position]
            self.position += 1
            self.operators += 1
            right = self._unary()
            if right is None:
                return None
            if operator == "*":
                value = value * right
            elif right == 0:
                # Keep parsing so a malformed rest still reads as "not an expression"; the value is reported undefined.
                self.divided_by_zero = True
                value = Fraction(0)
            else:
                value = value / right
        return value

    def _unary(self) -> Fraction | None:
        negative = False
        while self._peek() in ("-", "+"):
            negative ^= self.tokens[self.position] == "-"
            self.position += 1
        token = self._peek()
        if token is None or token in (")", "*", "/"):
            return None
        self.position += 1
        if token == "(":
            if self.depth == MAX_DEPTH:
                return None
            self.depth += 1
            value = self._expression()
            self.depth -= 1
            if value is None or self._peek() != ")":
                return None
            self.position += 1
        else:
            value = _number_value(token)
            if token.endswith("%"):
                value /= 100
        return -value if negative else value
