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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from abel_lightning.arithmetic import arithmetic_consistency
from abel_lightning.registry import Registry

SCfFunction = Callable[[Sequence[str], Sequence[str | None]], float]

# Selected by ``s_cf: <name>`` or the dotted path to a function of one's own (``mylab.cf.all_answered``).
S_CF: Registry[SCfFunction] = Registry("s_cf")


@dataclass(frozen=True)
class GroupScores:
    """The four Regime W scores of one question's group of trajectories, each in [0, 1]."""

    s_end: float
    s_path: float
    s_cf: float
    s_wm: float


@dataclass
class RegimeWConfig:
    """Regime W's scoring hyperparameters; the defaults are the project's reference values (see docs/REGIME_W.md).
    How many trajectories a group has is the sampler's business (``samples_per_question`` or the arms); scoring works
    on whatever group it is given."""

    s_cf: str = "arithmetic"
    weights: tuple[float, float, float] = (0.5, 0.3, 0.2)
    beta_coherence: float = 0.1
    beta_agreement: float = 0.05
    alpha_length: float = 0.05

    def __post_init__(self) -> None:
        # YAML and jsonargparse hand lists over; a tuple keeps the config hashable and comparable.
        self.weights = tuple(self.weights)
        _check_weights(self.weights)


def register_s_cf(name: str) -> Callable[[SCfFunction], SCfFunction]:
    """Register a counterfactual-coherence score under ``name`` (selectable as ``s_cf: name`` in config).

    The function receives the group's completions and extracted answers and returns a float in [0, 1]::

        @register_s_cf("all_answered")
        def all_answered(full_texts, answers):
            return sum(a is not None for a in answers) / len(answers)
    """
    return S_CF.register(name)


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
    s_cf_function = S_CF.get(s_cf)

    majority = majority_answer(answers)
    s_end = 0.0 if majority is None else sum(answer == majority for answer in answers) / k

    mean = sum(num_tokens) / k
    variance = sum((n - mean) ** 2 for n in num_tokens) / k
    # All-empty completions (mean 0) have no spread at all: perfectly consistent paths.
    s_path = 1.0 if mean == 0 else 1.0 - min(1.0, variance / mean**2)

    cf = float(s_cf_function(full_texts, answers))
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


@register_s_cf("arithmetic")
def arithmetic_s_cf(full_texts: Sequence[str], answers: Sequence[str | None]) -> float:
    """Mean of :func:`abel_lightning.arithmetic.arithmetic_consistency` over the group's trajectories."""
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
