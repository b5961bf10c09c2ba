"""Rewards for PPO, over one question's group of sampled completions, selectable as ``model.init_args.reward: <name>``
or by ``class_path`` (with ``init_args``) to a :class:`GroupReward` of your own.

A reward is called once per question::

    reward(question: str, completions: list[str], num_tokens: list[int], gold: str) -> list[float]

with the ``samples_per_question`` completions (without the prompt) in sampling order, their generated token counts
(EOS not counted, as in Regime W) and the gold answer; it returns one finite float per completion. A reward of one
completion alone is a plain function ``(completion, gold) -> float`` registered with ``@register_reward(name)``
(:class:`PerCompletion` adapts it). The rewards that judge answers take ``answer_checker`` (``gsm8k``, the default,
or ``math_verify``, or a class_path to an ``abel_lightning.answers.AnswerChecker``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from abel_lightning.answers import ANSWER_CHECKERS, AnswerChecker
from abel_lightning.regime_w import RegimeWConfig, score_group
from abel_lightning.registry import Registry

REWARDS: Registry[GroupReward | type[GroupReward]] = Registry("reward")


class GroupReward:
    """Rewards of one question's group of completions; see the module docstring for the call."""

    def __call__(self, question: str, completions: Sequence[str], num_tokens: Sequence[int], gold: str) -> list[float]:
        raise NotImplementedError


class PerCompletion(GroupReward):
    """A group reward made of a per-completion function ``fn(completion, gold) -> float``, applied to each."""

    def __init__(self, fn: Callable[[str, str], float]) -> None:
        self.fn = fn

    def __call__(self, question, completions, num_tokens, gold):
        return [float(self.fn(completion, gold)) for completion in completions]

    def __repr__(self) -> str:
        return f"PerCompletion({getattr(self.fn, '__qualname__', self.fn)})"


def register_reward(name: str) -> Callable[[Callable[[str, str], float]], Callable[[str, str], float]]:
    """Decorator: make a per-completion function ``fn(completion, gold) -> float`` selectable as ``reward: name``."""

    def register(fn: Callable[[str, str], float]) -> Callable[[str, str], float]:
        REWARDS.register(name)(PerCompletion(fn))
        return fn

    return register


@REWARDS.register("correctness")
class Correctness(GroupReward):
    """1.0 when a completion's final answer equals the gold answer, else 0.0 (the seed's reward), as
    ``answer_checker`` reads and judges it."""

    def __init__(self, answer_checker: str | AnswerChecker = "gsm8k") -> None:
        self.checker: AnswerChecker = ANSWER_CHECKERS.resolve(answer_checker)

    def __call__(self, question, completions, num_tokens, gold):
        return [float(right) for right in self.checker.judge(completions, gold)[1]]

    def __repr__(self) -> str:
        return f"Correctness({type(self.checker).__name__})"


@REWARDS.register("regime_w")
class RegimeW(GroupReward):
    """Regime W's per-trajectory reward (docs/REGIME_W.md) as a PPO reward: correctness plus the group's coherence,
    agreement with the majority answer, minus a length cost:

    ``reward_i = correct_i + beta_coherence * s_wm + beta_agreement * [a_i == majority] - alpha_length * n_i / 100``,
    ``s_wm = w_end * s_end + w_path * s_path + w_cf * s_cf`` of the group (``regime_w.score_group``).

    The arguments are Regime W's constants, with its reference values as defaults, and the answer checker.
    """

    def __init__(
        self,
        s_cf: str = "arithmetic",
        weights: tuple[float, float, float] = (0.5, 0.3, 0.2),
        beta_coherence: float = 0.1,
        beta_agreement: float = 0.05,
        alpha_length: float = 0.05,
        answer_checker: str | AnswerChecker = "gsm8k",
    ) -> None:
        self.checker: AnswerChecker = ANSWER_CHECKERS.resolve(answer_checker)
        self.config = RegimeWConfig(
            s_cf=s_cf,
            weights=tuple(weights),
            beta_coherence=beta_coherence,
            beta_agreement=beta_agreement,
            alpha_length=alpha_length,
        )

    def __call__(self, question, completions, num_tokens, gold):
        answers, correct = self.checker.judge(completions, gold)
        _, rewards = score_group(completions, answers, num_tokens, correct, self.config)
        return rewards

    def __repr__(self) -> str:
        return f"RegimeW({self.config})"
