"""Reward functions for PPO: a completion and the gold answer in, a scalar out. Add one with ``@register_reward``."""

from __future__ import annotations

from typing import Callable

from abel_lightning.answers import extract_answer, is_correct

RewardFn = Callable[[str, str], float]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def register(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return register


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
    return REWARDS[name]


@register_reward("correctness")
def correctness(completion: str, gold: str) -> float:
    """1.0 when the completion's final answer equals the gold answer numerically, else 0.0 (the seed's reward)."""
    return float(is_correct(extract_answer(completion), gold))
