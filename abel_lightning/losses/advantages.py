"""Advantage estimators for PPO, selectable by name from YAML (``model.init_args.advantage: grpo``).

Every estimator has one signature::

    estimator(scores [B], logprobs [B, T], ref_logprobs [B, T], values [B, T] | None, mask [B, T], *,
              group_size, kl_coef, gamma, lam, kl_estimator) -> (advantages [B, T], returns [B, T] | None)

Rows come group by group: the ``group_size`` samples of question 0, then those of question 1, and so on.
Advantages are 0 where ``mask`` is 0. ``returns`` are the value-head targets, None for critic-free estimators;
an estimator that needs the critic is registered with ``uses_critic=True`` and listed in ``ESTIMATORS_USING_CRITIC``
(built in: only ``gae``), which is how PPO decides whether to train a value head. Call under ``torch.no_grad()``.

Adding one: a function with the signature above and ``@register_advantage("name")`` above it (see docs/LOSSES.md).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from abel_lightning.losses.ppo import gae as generalized_advantage_estimation
from abel_lightning.losses.ppo import kl_estimator as kl_estimator_named
from abel_lightning.losses.ppo import masked_whiten, token_rewards

AdvantageEstimator = Callable[..., tuple[Tensor, Tensor | None]]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}
ESTIMATORS_USING_CRITIC: set[str] = set()

# Keeps a group whose samples all scored the same at advantage 0 instead of 0 / 0.
GROUP_STD_EPS = 1e-6


def register_advantage(name: str, uses_critic: bool = False) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: make ``fn`` selectable as ``advantage: name``; ``uses_critic`` when it reads ``values``."""

    def register(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered (by {ADVANTAGE_ESTIMATORS[name]})")
        ADVANTAGE_ESTIMATORS[name] = fn
        if uses_critic:
            ESTIMATORS_USING_CRITIC.add(name)
        return fn

    return register


def advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered as ``name``; ValueError naming the registered ones otherwise."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; registered: {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


def sequence_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float, kl_estimator: str
) -> Tensor:
    """KL-penalised reward of each whole sequence: ``r_i = score_i - beta * sum_t KL_{i,t}`` (sum over real tokens).

    ``scores``: ``[B]``; the rest ``[B, T]``. Returns ``[B]``.
    """
    kl = kl_estimator_named(kl_estimator)(logprobs, ref_logprobs) * mask.to(logprobs.dtype)
    return scores.to(logprobs.dtype) - kl_coef * kl.sum(dim=1)


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """``[B]`` -> ``[B / group_size, group_size]``, one row per question."""
    if group_size < 2 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"group-relative advantages need group_size >= 2 dividing the batch, got group_size={group_size} "
            f"for {rewards.shape[0]} rows; sample at least 2 responses per question and keep each question's together"
        )
    return rewards.view(-1, group_size)


@register_advantage("gae", uses_critic=True)
def gae_advantages(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    values: Tensor | None,
    mask: Tensor,
    *,
    group_size: int,
    kl_coef: float,
    gamma: float,
    lam: float,
    kl_estimator: str,
) -> tuple[Tensor, Tensor]:
    """PPO with a critic (Ziegler et al. 2019): per-token KL-penalised rewards (``token_rewards``), GAE over them,
    then advantages whitened over the batch's real tokens. Returns are GAE's ``A + V``, not whitened."""
    if values is None:
        raise ValueError("advantage estimator 'gae' needs the value head's values; got values=None")
    rewards, _ = token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_estimator)
    advantages, returns = generalized_advantage_estimation(rewards, values, mask, gamma, lam)
    return masked_whiten(advantages, mask), returns


@register_advantage("grpo")
def grpo_advantages(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    values: Tensor | None,
    mask: Tensor,
    *,
    group_size: int,
    kl_coef: float,
    gamma: float,
    lam: float,
    kl_estimator: str,
) -> tuple[Tensor, None]:
    """Group-relative advantage of GRPO (Shao et al. 2024, DeepSeekMath, outcome supervision):
    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` on every response token of row ``i``.

    ``r_i`` is ``sequence_rewards`` (score minus ``kl_coef`` times the summed KL): the paper puts the KL in the loss
    instead; folding it into the reward lets GRPO share PPO's clipped loss. ``std`` is unbiased (as in TRL and verl).
    ``gamma`` and ``lam`` are unused.
    """
    rewards = _groups(sequence_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_estimator), group_size)
    normalized = (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + GROUP_STD_EPS)
    return normalized.reshape(-1, 1) * mask.to(logprobs.dtype), None


@register_advantage("rloo")
def rloo_advantages(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    values: Tensor | None,
    mask: Tensor,
    *,
    group_size: int,
    kl_coef: float,
    gamma: float,
    lam: float,
    kl_estimator: str,
) -> tuple[Tensor, None]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): ``A_i = r_i - 1/(k-1) * sum_{j != i} r_j`` within the group
    of ``k = group_size``, on every response token of row ``i``. ``r_i`` is ``sequence_rewards``.
    ``gamma`` and ``lam`` are unused.
    """
    rewards = _groups(sequence_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_estimator), group_size)
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (group_size - 1)
    return (rewards - baseline).reshape(-1, 1) * mask.to(logprobs.dtype), None
