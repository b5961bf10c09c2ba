"""Regime W: group coherence scores of k trajectories for one question, and the per-trajectory reward.

Definitions (docs/REGIME_W.md has them for users, with examples), for answers ``a_i``, token counts ``n_i``, i = 1..k:

- ``s_end  = #{i : a_i == majority} / k``, 0 when no trajectory has an answer;
- ``s_path = 1 - min(1, var(n) / mean(n)**2)`` (population variance);
- ``s_cf``  = a registered counterfactual-coherence function of the group (default ``arithmetic``);
- ``s_wm   = w_end*s_end + w_path*s_path + w_cf*s_cf`` (weights sum to 1, so every score lies in [0, 1]);
- ``reward_i = correct_i + beta_coherence*s_wm + beta_agreement*[a_i == majority] - alpha_length*n_i/100``.

Answers are compared as strings, so they must come normalized from :func:`abel_lightning.answers.extract_answer`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

SCfFunction = Callable[[Sequence[str], Sequence[str | None]], float]

S_CF: dict[str, SCfFunction] = {}


@dataclass(frozen=True)
class GroupScores:
    """The four Regime W scores of one question's group of trajectories, each in [0, 1]."""

    s_end: float
    s_path: float
    s_cf: float
    s_wm: float


@dataclass
class RegimeWConfig:
    """Regime W hyperparameters; the defaults are the project's reference values (see docs/REGIME_W.md).

    ``k`` is how many trajectories the rollout phase samples per question; scoring works on whatever group it is given.
    """

    k: int = 8
    s_cf: str = "arithmetic"
    weights: tuple[float, float, float] = (0.5, 0.3, 0.2)
    beta_coherence: float = 0.1
    beta_agreement: float = 0.05
    alpha_length: float = 0.05

    def __post_init__(self) -> None:
        # YAML and jsonargparse hand lists over; a tuple keeps the config hashable and comparable.
        self.weights = tuple(self.weights)
        if self.k < 1:
            raise ValueError(f"RegimeWConfig.k must be at least 1, got {self.k}")
        _check_weights(self.weights)


def register_s_cf(name: str) -> Callable[[SCfFunction], SCfFunction]:
    """Register a counterfactual-coherence score under ``name`` (selectable as ``s_cf: name`` in config).

    The function receives the group's completions and extracted answers and returns a float in [0, 1]::

        @register_s_cf("all_answered")
        def all_answered(full_texts, answers):
            return sum(a is not None for a in answers) / len(answers)
    """

    def decorator(function: SCfFunction) -> SCfFunction:
        if name in S_CF:
            taken = S_CF[name].__qualname__
            raise ValueError(f"an s_cf named {name!r} is already registered ({taken}); pick another name")
        S_CF[name] = function
        return function

    return decorator


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The most common non-empty answer; ties go to the one that appears first. None when no answer is non-empty.

    Example: ``["20", "18", "18", "20", None]`` -> ``"20"`` (2 votes each, ``"20"`` came first).
    """
    counts: dict[str, int] = {}
    for answer in answers:
        if answer:
            counts[answer] = counts.get(answer, 0) + 1
    if not counts:
        return None
    # max returns the first maximal item, and dicts keep first-appearance order: that is the tie rule.
    return max(counts, key=counts.__getitem__)


def group_scores(
    full_texts: Sequence[str],
    answers: Sequence[str | None],
    num_tokens: Sequence[int],
    s_cf: str = "arithmetic",
    weights: tuple[float, float, float] = (0.5, 0.3, 0.2),
) -> GroupScores:
    """Score one question's k trajectories (completions without the prompt, their answers, generated token counts).

    Example (k = 4): answers ``18, 18, 20, None``, tokens ``100, 120, 80, 100``, one arithmetic claim each with the
    third false -> ``GroupScores(s_end=0.5, s_path=0.98, s_cf=0.75, s_wm=0.694)``.
    """
    k = _check_group(full_texts, answers, num_tokens)
    _check_weights(weights)
    if s_cf not in S_CF:
        raise ValueError(f"unknown s_cf {s_cf!r}: registered ones are {sorted(S_CF)} (add one with @register_s_cf)")

    majority = majority_answer(answers)
    s_end = 0.0 if majority is None else sum(answer == majority for answer in answers) / k

    mean = sum(num_tokens) / k
    variance = sum((n - mean) ** 2 for n in num_tokens) / k
    # All-empty completions (mean 0) have no spread at all: perfectly consistent paths.
    s_path = 1.0 if mean == 0 else 1.0 - min(1.0, variance / mean**2)

    cf = float(S_CF[s_cf](full_texts, answers))
    if not 0.0 <= cf <= 1.0:
        raise ValueError(f"s_cf {s_cf!r} returned {cf}, outside [0, 1]; fix the registered function")

    w_end, w_path, w_cf = weights
    return GroupScores(s_end=s_end, s_path=s_path, s_cf=cf, s_wm=w_end * s_end + w_path * s_path + w_cf * cf)


def trajectory_rewards(
    correct: Sequence[bool],
    answers: Sequence[str | None],
    num_tokens: Sequence[int],
    scores: GroupScores,
    beta_coherence: float = 0.1,
    beta_agreement: float = 0.05,
    alpha_length: float = 0.05,
) -> list[float]:
    """``reward_i = correct_i + beta_coherence*s_wm + beta_agreement*agrees_i - alpha_length*num_tokens_i/100``.

    ``agrees_i`` is 1 when answer i equals the group's majority answer. Range: about
    ``[-alpha_length*max_tokens/100, 1 + beta_coherence + beta_agreement]``; with the defaults a correct, agreeing
    100-token trajectory in a group with ``s_wm = 0.694`` gets ``1 + 0.0694 + 0.05 - 0.05 = 1.0694``.
    """
    _check_group(correct, answers, num_tokens)
    majority = majority_answer(answers)
    return [
        float(is_right)
        + beta_coherence * scores.s_wm
        + beta_agreement * float(majority is not None and answer == majority)
        - alpha_length * tokens / 100
        for is_right, answer, tokens in zip(correct, answers, num_tokens)
    ]


def score_group(
    full_texts: Sequence[str],
    answers: Sequence[str | None],
    num_tokens: Sequence[int],
    correct: Sequence[bool],
    config: RegimeWConfig,
) -> tuple[GroupScores, list[float]]:
    """Group scores and per-trajectory rewards of one question, with the hyperparameters of ``config``."""
    scores = group_scores(full_texts, answers, num_tokens, s_cf=config.s_cf, weights=config.weights)
    rewards = trajectory_rewards(
        correct,
        answers,
        num_tokens,
        scores,
        beta_coherence=config.beta_coherence,
        beta_agreement=config.beta_agreement,
        alpha_length=config.alpha_length,
    )
    return scores, rewards


# --- arithmetic consistency -------------------------------------------------------------------------------------------

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
    Expressions are evaluated by a small parser over exact fractions, never by Python ``eval``.
    """
    claims = _claims(text)
    checked = [_claim_holds(claim) for claim in claims]
    verdicts = [verdict for verdict in checked if verdict is not None]
    return sum(verdicts) / len(verdicts) if verdicts else 1.0


@register_s_cf("arithmetic")
def arithmetic_s_cf(full_texts: Sequence[str], answers: Sequence[str | None]) -> float:
    """Mean of :func:`arithmetic_consistency` over the group's trajectories."""
    return sum(arithmetic_consistency(text) for text in full_texts) / len(full_texts)


@register_s_cf("loo")
def leave_one_out_s_cf(full_texts: Sequence[str], answers: Sequence[str | None]) -> float:
    """Fraction of trajectories whose answer equals the majority answer of the other k-1 (leave-one-out consensus).

    Example: ``18, 18, 20, None`` -> 0.5 (each 18 matches the other 18; 20 and None match nothing).
    """
    agreeing = 0
    for index, answer in enumerate(answers):
        others = majority_answer([*answers[:index], *answers[index + 1 :]])
        agreeing += bool(answer) and answer == others
    return agreeing / len(answers)


def _claims(text: str) -> list[_Claim]:
    """Every ``expression = number`` pair in ``text``, annotations first."""
    claims = []
    for annotation in _ANNOTATION_RE.findall(text):
        claims.extend(_chain_claims(annotation.split("="), first_is_whole=True, last_is_whole=True))
    # An annotation repeats the inline arithmetic next to it ("48/2 = <<48/2=24>>24"); cutting it out with a line break
    # leaves "48/2 = " and "24" in separate runs so the claim is counted once.
    prose = _ANNOTATION_RE.sub("\n", text)
    # Unicode minus and the en dash GSM8K writers use as minus; "**" is Markdown bold here, not a power.
    prose = prose.replace("\u2212", "-").replace("\u2013", "-").replace("\u00f7", "/").replace("\\div", "/")
    prose = prose.replace("**", " ")
    prose = _PUNCTUATION_RE.sub("\n", _TIMES_RE.sub("*", prose))
    for run in _MATH_RUN_RE.finditer(prose):
        if "=" not in run.group(0):
            continue
        before = prose[: run.start()].rstrip(" \t")[-1:]
        after = prose[run.end() : run.end() + 1]
        body = run.group(0)
        # Algebra with letters ("2X + 3 = 7", "100 = 5A") splits into runs at the letters; a run that continues a
        # term of such an expression, or ends inside one, would yield a claim about a fragment.
        continues_term = bool(before) and (before.isalnum() or before in ")]") and body.lstrip()[:1] in "+-*/)"
        glued_left = run.start() > 0 and _glues(prose[run.start() - 1]) and not body[:1].isspace()
        glued_right = _glues(after) and not body[-1:].isspace()
        first_is_whole = not (continues_term or glued_left)
        claims.extend(_chain_claims(body.split("="), first_is_whole, last_is_whole=not glued_right))
    return claims


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
        if _STATED_RE.fullmatch(stated):
            claims.append(_Claim(_trim_expression(left), stated))
    return claims


def _trim_expression(left: str) -> str:
    """Drop an opening parenthesis that the claim sits inside ("(2 * 3 = 6)") and stray list markers ("* 2 + 3")."""
    expression = left.strip().lstrip("*+ \t")
    while expression.startswith("(") and expression.count("(") > expression.count(")"):
        expression = expression[1:].lstrip()
    return expression


def _claim_holds(claim: _Claim) -> bool | None:
    """True/False for a checkable claim; None when the left side is no expression (a bare number, unparseable)."""
    parsed = _ExpressionParser(claim.expression).parse()
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


class _ExpressionParser:
    """Recursive descent over ``+ - * /``, parentheses and unary minus, in exact fractions.

    Grammar: ``expr := term (("+"|"-") term)*``, ``term := unary (("*"|"/") unary)*``,
    ``unary := ("-"|"+") unary | "(" expr ")" | number``; a number's ``%`` divides it by 100.
    """

    _TOKEN_RE = re.compile(r"\s*(?:(" + _NUMBER_RE.pattern + r")|([-+*/()]))")

    def __init__(self, source: str) -> None:
        self.tokens = self._tokenize(source.rstrip())
        self.position = 0
        self.operators = 0
        self.divided_by_zero = False

    @classmethod
    def _tokenize(cls, source: str) -> list[str]:
        """Numbers and operator characters; empty when anything else occurs (such a side is not an expression)."""
        tokens = []
        position = 0
        while position < len(source):
            match = cls._TOKEN_RE.match(source, position)
            if match is None:
                return []
            tokens.append(match.group(1) or match.group(2))
            position = match.end()
        return tokens

    def parse(self) -> tuple[Fraction | None, int] | None:
        """``(value, binary operator count)``; value None after a division by zero; None when not an expression."""
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
        token = self._peek()
        if token is None or token in (")", "*", "/"):
            return None
        self.position += 1
        if token in ("-", "+"):
            operand = self._unary()
            return None if operand is None else (-operand if token == "-" else operand)
        if token == "(":
            value = self._expression()
            if value is None or self._peek() != ")":
                return None
            self.position += 1
            return value
        value = _number_value(token)
        return value / 100 if token.endswith("%") else value


def _check_group(per_trajectory: Sequence[object], answers: Sequence[str | None], num_tokens: Sequence[int]) -> int:
    """The group size k, after checking that texts (or correctness flags), answers and token counts describe the same
    k >= 1 trajectories."""
    k = len(answers)
    if k == 0:
        raise ValueError("a Regime W group needs at least one trajectory, got none")
    if len(per_trajectory) != k or len(num_tokens) != k:
        raise ValueError(
            f"a group's sequences must have one entry per trajectory: got {len(per_trajectory)} texts/flags, {k} "
            f"answers, {len(num_tokens)} token counts"
        )
    if any(n < 0 for n in num_tokens):
        raise ValueError(f"token counts must be >= 0, got {list(num_tokens)}")
    return k


def _check_weights(weights: Sequence[float]) -> None:
    """Weights are three non-negative numbers summing to 1, which keeps s_wm in [0, 1]."""
    if len(weights) != 3 or any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-9:
        raise ValueError(
            "Regime W weights (s_end, s_path, s_cf) must be three non-negative numbers summing to 1, "
            f"got {tuple(weights)}"
        )
