"""Policy objectives of PPO-style updates and the aggregations that turn their per-token losses into one number.

An objective is a small class owning its hyperparameters, selectable as ``model.init_args.policy_objective: <name>``
or by ``class_path`` to a :class:`PolicyObjective` of your own; likewise ``loss_aggregation``. Called as::

    objective(logprobs [B, T] (with grad), old_logprobs [B, T], advantages [B, T], mask [B, T])
        -> (per-token loss [B, T], PolicyLossStats)
    aggregation(per_token_loss [B, T], mask [B, T]) -> scalar loss

Rows are the minibatch's responses, right-padded; ``mask`` is 1 on real response tokens. The per-token loss is a loss to
minimise (the negated surrogate); PPO adds ``kl_coef * KL_t`` to it when the KL penalty is in the loss
(``kl_in: loss``), then aggregates.

References: Schulman et al. 2017 (PPO clip); Ye et al. 2020, "Mastering Complex Control in MOBA Games" (dual clip);
Yu et al. 2025, DAPO (clip-higher); Zheng et al. 2025, GSPO (sequence-level ratio); Liu et al. 2025, "Understanding
R1-Zero-Like Training" (Dr. GRPO's sum over a constant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from abel_lightning.losses.ppo import masked_mean
from abel_lightning.registry import Registry

POLICY_OBJECTIVES: Registry[type[PolicyObjective]] = Registry("policy objective")
LOSS_AGGREGATIONS: Registry[type[LossAggregation]] = Registry("loss aggregation")


@dataclass
class PolicyLossStats:
    """Diagnostics of one objective call, all detached scalars (masked means over tokens).

    ``clip_fraction``: share of tokens where a clipped term was the one taken. ``approx_kl``:
    ``0.5 * (log p - log p_old)^2`` per token, an estimate of KL(old || new) (what ``target_kl`` stops on, whatever the
    objective). ``ratio_mean``: mean of the ratio the objective used (per token, or per sequence for GSPO).
    """

    clip_fraction: Tensor
    approx_kl: Tensor
    ratio_mean: Tensor


class PolicyObjective:
    """Per-token policy loss of a minibatch; see the module docstring for the call."""

    def __call__(
        self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor
    ) -> tuple[Tensor, PolicyLossStats]:
        raise NotImplementedError


def clipped_surrogate(ratio: Tensor, advantages: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """``(unclipped, taken)`` with ``unclipped = -A * rho`` and ``taken = max(-A * rho, -A * clip(rho, low, high))``,
    all ``[B, T]``: the pessimistic side of PPO's surrogate, as a loss."""
    unclipped = -advantages * ratio
    return unclipped, torch.maximum(unclipped, -advantages * torch.clamp(ratio, low, high))


def policy_stats(log_ratio: Tensor, ratio: Tensor, clipped: Tensor, mask: Tensor) -> PolicyLossStats:
    """Detached diagnostics; ``clipped``: bool ``[B, T]``, true where a clipped term was taken."""
    with torch.no_grad():
        return PolicyLossStats(
            clip_fraction=masked_mean(clipped.to(log_ratio.dtype), mask),
            approx_kl=masked_mean(0.5 * log_ratio.detach() ** 2, mask),
            ratio_mean=masked_mean(ratio.detach(), mask),
        )


@POLICY_OBJECTIVES.register("ppo-clip")
class PPOClip(PolicyObjective):
    """Clipped surrogate of PPO (Schulman et al. 2017, eq. 7), the seed's objective.

    ``rho_t = exp(log p_t - log p_old_t)``;  ``l_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))``.
    """

    def __init__(self, clip_range: float = 0.2) -> None:
        self.clip_range = clip_range

    def __call__(self, logprobs, old_logprobs, advantages, mask):
        log_ratio = logprobs - old_logprobs
        ratio = torch.exp(log_ratio)
        unclipped, taken = clipped_surrogate(ratio, advantages, 1.0 - self.clip_range, 1.0 + self.clip_range)
        return taken, policy_stats(log_ratio, ratio, taken > unclipped, mask)


@POLICY_OBJECTIVES.register("clip-higher")
class ClipHigher(PolicyObjective):
    """DAPO's asymmetric clip (Yu et al. 2025): a wider upper bound lets unlikely tokens with positive advantage grow.

    ``l_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps_low, 1 + eps_high))``; DAPO uses 0.2 and 0.28.
    """

    def __init__(self, eps_low: float = 0.2, eps_high: float = 0.28) -> None:
        self.eps_low, self.eps_high = eps_low, eps_high

    def __call__(self, logprobs, old_logprobs, advantages, mask):
        log_ratio = logprobs - old_logprobs
        ratio = torch.exp(log_ratio)
        unclipped, taken = clipped_surrogate(ratio, advantages, 1.0 - self.eps_low, 1.0 + self.eps_high)
        return taken, policy_stats(log_ratio, ratio, taken > unclipped, mask)


@POLICY_OBJECTIVES.register("dual-clip")
class DualClip(PolicyObjective):
    """Dual-clip PPO (Ye et al. 2020; verl's ``clip_ratio_c``): for a negative advantage the loss is also capped at
    ``-A_t * c``, so a token whose ratio has run far above 1 cannot dominate the update.

    ``l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))``, and where ``A_t < 0``: ``min(l_t, -A_t * c)``;
    ``c > 1`` (verl's default 3).
    """

    def __init__(self, clip_range: float = 0.2, clip_ratio_c: float = 3.0) -> None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"DualClip(clip_ratio_c={clip_ratio_c}): the lower bound c must be > 1")
        self.clip_range, self.clip_ratio_c = clip_range, clip_ratio_c

    def __call__(self, logprobs, old_logprobs, advantages, mask):
        log_ratio = logprobs - old_logprobs
        ratio = torch.exp(log_ratio)
        unclipped, taken = clipped_surrogate(ratio, advantages, 1.0 - self.clip_range, 1.0 + self.clip_range)
        loss = torch.where(advantages < 0, torch.minimum(taken, -advantages * self.clip_ratio_c), taken)
        return loss, policy_stats(log_ratio, ratio, loss != unclipped, mask)


@POLICY_OBJECTIVES.register("gspo")
class GSPO(PolicyObjective):
    """Group Sequence Policy Optimization (Zheng et al. 2025): one importance ratio per response, the geometric mean
    of its token ratios, clipped per sequence.

    ``s_i = exp(mean_t (log p_{i,t} - log p_old_{i,t}))`` over the real tokens of row ``i``; every token carries
    ``s_{i,t} = sg[s_i] * p_{i,t} / sg[p_{i,t}]`` (value ``s_i``, gradient ``s_i * grad log p_{i,t}``);
    ``l_{i,t} = max(-A_i s_{i,t}, -A_i clip(s_{i,t}, 1 - eps_low, 1 + eps_high))``. The paper's bounds are 3e-4 and
    4e-4 and its loss a mean over sequences of token means: pair it with ``loss_aggregation: seq-mean-token-mean``.
    The log-ratio is clamped at 10 before ``exp``, as verl does, so one runaway sequence cannot overflow.
    """

    def __init__(self, eps_low: float = 3e-4, eps_high: float = 4e-4) -> None:
        self.eps_low, self.eps_high = eps_low, eps_high

    def __call__(self, logprobs, old_logprobs, advantages, mask):
        mask = mask.to(logprobs.dtype)
        log_ratio = logprobs - old_logprobs
        sequence_log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1.0)
        token_log_ratio = logprobs - logprobs.detach() + sequence_log_ratio.detach()
        ratio = torch.exp(token_log_ratio.clamp(max=10.0))
        unclipped, taken = clipped_surrogate(ratio, advantages, 1.0 - self.eps_low, 1.0 + self.eps_high)
        return taken, policy_stats(log_ratio, ratio, taken > unclipped, mask)


class LossAggregation:
    """Per-token loss ``[B, T]`` and mask ``[B, T]`` -> scalar loss."""

    def __call__(self, loss: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError


@LOSS_AGGREGATIONS.register("token-mean")
class TokenMean(LossAggregation):
    """``sum_{i,t} l_{i,t} m_{i,t} / sum_{i,t} m_{i,t}``: every real token of the minibatch weighs the same (the seed's,
    DAPO's)."""

    def __call__(self, loss, mask):
        return masked_mean(loss, mask)


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
class SeqMeanTokenMean(LossAggregation):
    """``1/B sum_i (sum_t l_{i,t} m_{i,t} / sum_t m_{i,t})``: every response weighs the same, its tokens share that
    weight (GRPO as published, GSPO). A row with no real token counts as a 0."""

    def __call__(self, loss, mask):
        return masked_mean(loss, mask, dim=1).mean()


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm")
class TokenSumOverConstant(LossAggregation):
    """Dr. GRPO (Liu et al. 2025): ``sum_{i,t} l_{i,t} m_{i,t} / (B * L)`` with ``L`` a constant, so neither the
    response length nor the batch's token count rescales a token's gradient.

    ``max_tokens``: ``L``; set it to ``sampling.max_new_tokens`` for the paper's and TRL's ``dr_grpo`` (which divides
    by ``max_completion_length``). None divides by the minibatch's padded width ``T`` instead, verl's fallback, which
    is constant only if every minibatch is padded to the same width. verl's own divisor omits ``B``.
    """

    def __init__(self, max_tokens: int | None = None) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"TokenSumOverConstant(max_tokens={max_tokens}): give a positive token count, or null")
        self.max_tokens = max_tokens

    def __call__(self, loss, mask):
        width = self.max_tokens if self.max_tokens is not None else loss.shape[-1]
        return (loss * mask.to(loss.dtype)).sum() / (loss.shape[0] * width)
