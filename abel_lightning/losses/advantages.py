"""Advantage estimators for PPO, selectable as ``model.init_args.advantage: <name>`` or by ``class_path`` (with
``init_args``) to an :class:`AdvantageEstimator` of your own. Each estimator owns its hyperparameters.

Every estimator is called with one :class:`AdvantageInputs` and returns ``(advantages [B, T], returns [B, T] | None)``:
advantages are 0 where ``mask`` is 0; ``returns`` are the value-head targets, None for critic-free estimators. Rows come
group by group: the ``samples_per_question`` samples of question 0, then those of question 1, and so on. PPO calls it
under ``torch.no_grad()``.

Two class attributes tell PPO how to run one: ``uses_critic`` (train a value head and pass ``values``) and ``kl_in``,
where the KL penalty goes when the config leaves ``kl_in`` unset: ``"reward"`` (folded in with ``kl_coef``) or
``"loss"`` (added to the policy loss; the estimator then sees ``kl_coef = 0``). Group estimators default to the loss,
so a group whose scores are all equal gets advantage 0 rather than a unit-scale signal made of KL alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from abel_lightning.losses.ppo import gae, masked_whiten, token_rewards
from abel_lightning.registry import Registry

ADVANTAGE_ESTIMATORS: Registry[type[AdvantageEstimator]] = Registry("advantage estimator")


@dataclass
class AdvantageInputs:
    """What an estimator sees of one rollout batch of ``B`` responses (``B = questions * samples_per_question``).

    ``scores``: ``[B]``, the reward of each whole response. ``kl``: ``[B, T]``, the per-token KL estimate of the
    sampling policy against the reference (``kl_penalty``), 0 on padding. ``kl_coef``: the coefficient to fold the KL
    into the reward with; 0 when the penalty is in the loss. ``values``: ``[B, T]`` value-head outputs when
    ``uses_critic``, else None. ``mask``: ``[B, T]``, 1 on real response tokens. ``logprobs``, ``ref_logprobs``:
    ``[B, T]`` of the sampled tokens under the sampling policy and the reference.
    """

    scores: Tensor
    kl: Tensor
    kl_coef: float
    values: Tensor | None
    mask: Tensor
    samples_per_question: int
    logprobs: Tensor
    ref_logprobs: Tensor

    def penalised_scores(self) -> Tensor:
        """``r_i = score_i - kl_coef * sum_t KL_{i,t}`` (sum over real tokens), ``[B]``."""
        return self.scores.to(self.kl.dtype) - self.kl_coef * self.kl.sum(dim=1)

    def groups(self, per_response: Tensor) -> Tensor:
        """``[B]`` -> ``[B / samples_per_question, samples_per_question]``, one row per question."""
        k = self.samples_per_question
        if k < 2 or per_response.shape[0] % k != 0:
            raise ValueError(
                f"group-relative advantages need model.init_args.samples_per_question >= 2 dividing the batch, got "
                f"samples_per_question={k} for {per_response.shape[0]} rows; sample at least 2 responses per question "
                "and keep each question's together"
            )
        return per_response.view(-1, k)

    def per_token(self, per_response: Tensor) -> Tensor:
        """``[B]`` or ``[B / k, k]`` -> ``[B, T]``: each response's value on every one of its real tokens."""
        return per_response.reshape(-1, 1) * self.mask.to(self.kl.dtype)


class AdvantageEstimator:
    """``estimator(inputs: AdvantageInputs) -> (advantages [B, T], returns [B, T] | None)``."""

    uses_critic: ClassVar[bool] = False
    kl_in: ClassVar[Literal["reward", "loss"]] = "reward"

    def __call__(self, inputs: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


@ADVANTAGE_ESTIMATORS.register("gae")
class GAE(AdvantageEstimator):
    """PPO with a critic (Ziegler et al. 2019), the seed's estimator: per-token KL-penalised rewards
    (``token_rewards``), GAE over them (``gamma``, ``lam``; Schulman et al. 2016), then advantages whitened over the
    batch's real tokens. Returns are GAE's ``A + V``, not whitened."""

    uses_critic = True
    kl_in = "reward"

    def __init__(self, gamma: float = 1.0, lam: float = 0.95) -> None:
        self.gamma, self.lam = gamma, lam

    def __call__(self, inputs):
        if inputs.values is None:
            raise ValueError("advantage estimator 'gae' needs the value head's values; got values=None")
        rewards = token_rewards(inputs.scores, inputs.kl, inputs.mask, inputs.kl_coef)
        advantages, returns = gae(rewards, inputs.values, inputs.mask, self.gamma, self.lam)
        return masked_whiten(advantages, inputs.mask), returns


@ADVANTAGE_ESTIMATORS.register("grpo")
class GRPO(AdvantageEstimator):
    """Group-relative advantage of GRPO (Shao et al. 2024, DeepSeekMath, outcome supervision), on every response token:

    - ``scale_rewards: group``: ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` (the paper);
    - ``batch``: ``(r_i - mean(r_group)) / (std(r_batch) + eps)`` (TRL's ``scale_rewards="batch"``);
    - ``none``: ``r_i - mean(r_group)`` (Dr. GRPO, Liu et al. 2025: the std favours questions that are too easy or
      too hard).

    ``r_i`` is the score minus ``kl_coef`` times the summed KL (``kl_coef`` is 0 with the KL in the loss, the default).
    ``std`` is unbiased, as in TRL and verl; ``eps`` keeps a group of equal rewards at 0 instead of 0 / 0 (TRL uses
    1e-4, verl 1e-6).
    """

    kl_in = "loss"

    def __init__(self, scale_rewards: Literal["group", "batch", "none"] = "group", eps: float = 1e-6) -> None:
        if scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"GRPO(scale_rewards={scale_rewards!r}): choose 'group', 'batch' or 'none'")
        self.scale_rewards, self.eps = scale_rewards, eps

    def __call__(self, inputs):
        rewards = inputs.groups(inputs.penalised_scores())
        centred = rewards - rewards.mean(dim=1, keepdim=True)
        if self.scale_rewards == "group":
            centred = centred / (rewards.std(dim=1, keepdim=True) + self.eps)
        elif self.scale_rewards == "batch":
            centred = centred / (rewards.std() + self.eps)
        return inputs.per_token(centred), None


@ADVANTAGE_ESTIMATORS.register("rloo")
class RLOO(AdvantageEstimator):
    """REINFORCE leave-one-out (Ahmadian et al. 2024): ``A_i = r_i - 1/(k-1) * sum_{j != i} r_j`` within the group of
    ``k = samples_per_question``, on every response token; ``r_i`` as in :class:`GRPO`."""

    kl_in = "loss"

    def __call__(self, inputs):
        rewards = inputs.groups(inputs.penalised_scores())
        baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (inputs.samples_per_question - 1)
        return inputs.per_token(rewards - baseline), None


def whitened_reward_to_go(scores: Tensor, inputs: AdvantageInputs, gamma: float) -> tuple[Tensor, Tensor]:
    """REINFORCE++'s advantage: per-token rewards ``-kl_coef * KL_t`` plus ``scores`` on the last real token,
    returns ``G_t = sum_{s >= t} gamma^(s-t) r_s``, whitened over the batch's real tokens. Returns
    ``(advantages, G)``, both ``[B, T]``."""
    rewards = token_rewards(scores, inputs.kl, inputs.mask, inputs.kl_coef)
    # GAE with zero values and lam = 1 is exactly the discounted reward-to-go.
    returns, _ = gae(rewards, torch.zeros_like(rewards), inputs.mask, gamma, lam=1.0)
    return masked_whiten(returns, inputs.mask), returns


@ADVANTAGE_ESTIMATORS.register("reinforce++")
class ReinforcePlusPlus(AdvantageEstimator):
    """REINFORCE++ (Hu 2025): no critic, no group; the discounted reward-to-go of KL-penalised token rewards,
    whitened over the whole batch (the batch mean is the baseline). KL in the reward by default, as published."""

    kl_in = "reward"

    def __init__(self, gamma: float = 1.0) -> None:
        self.gamma = gamma

    def __call__(self, inputs):
        advantages, _ = whitened_reward_to_go(inputs.scores, inputs, self.gamma)
        return advantages, None


@ADVANTAGE_ESTIMATORS.register("reinforce++-baseline")
class ReinforcePlusPlusBaseline(AdvantageEstimator):
    """REINFORCE++-baseline (Hu 2025): each score minus its group's mean score, ``score_i - mean(score_group)``, then
    as :class:`ReinforcePlusPlus` with ``gamma = 1``: token rewards with the KL penalty (when in the reward),
    reward-to-go, whitened over the batch. The group mean removes the question's difficulty, the batch whitening sets
    the scale (no division by a group's std)."""

    kl_in = "loss"

    def __call__(self, inputs):
        scores = inputs.groups(inputs.scores.to(inputs.kl.dtype))
        centred = (scores - scores.mean(dim=1, keepdim=True)).reshape(-1)
        advantages, _ = whitened_reward_to_go(centred, inputs, gamma=1.0)
        return advantages, None
