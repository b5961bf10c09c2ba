"""Per-token estimators of KL(policy || reference) on tokens sampled from the policy (Schulman 2020, "Approximating KL
divergence"), selectable as ``model.init_args.kl_penalty: k1 | k2 | k3`` or by ``class_path`` to a ``KLEstimator``.

With ``d_t = log p_ref_t - log p_t`` (``logprobs`` and ``ref_logprobs``: any equal shapes, e.g. ``[B, T]``):

- ``k1 = -d``: unbiased, high variance, negative on some tokens;
- ``k2 = d^2 / 2``: biased, low variance, never negative; its gradient is the gradient of the KL (in expectation);
- ``k3 = exp(d) - d - 1``: unbiased, low variance, never negative (GRPO's penalty, Shao et al. 2024).

PPO uses the estimate twice: summed over a response for the KL controller and the logged ``kl``, and as the penalty,
either folded into the reward (``kl_in: reward``) or added to the per-token loss (``kl_in: loss``), see docs/PPO.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from abel_lightning.registry import Registry

KL_ESTIMATORS: Registry[type[KLEstimator]] = Registry("KL estimator")


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 estimator of KL(policy || ref): ``log p - log p_ref``. Same shape in and out."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 estimator of KL(policy || ref): ``0.5 * (log p - log p_ref)^2``. Same shape in and out."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 estimator of KL(policy || ref): ``exp(d) - d - 1`` with ``d = log p_ref - log p``. Same shape in and out."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


class KLEstimator:
    """A per-token KL estimate, optionally clamped to ``[-clamp, clamp]`` (verl clamps k3 to 10 against the rare
    token whose reference probability is far above the policy's: ``exp(d)`` grows without bound).

    Subclasses implement :meth:`estimate`; ``__call__`` applies the clamp.
    """

    def __init__(self, clamp: float | None = None) -> None:
        if clamp is not None and clamp <= 0:
            raise ValueError(f"{type(self).__name__}(clamp={clamp}): clamp must be > 0, or null for no clamp")
        self.clamp = clamp

    def estimate(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        kl = self.estimate(logprobs, ref_logprobs)
        return kl if self.clamp is None else kl.clamp(-self.clamp, self.clamp)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(clamp={self.clamp})"


@KL_ESTIMATORS.register("k1")
class K1(KLEstimator):
    """``k1 = log p - log p_ref`` (Schulman 2020); the seed's penalty in the reward."""

    def estimate(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        return kl_k1(logprobs, ref_logprobs)


@KL_ESTIMATORS.register("k2")
class K2(KLEstimator):
    """``k2 = 0.5 * (log p - log p_ref)^2`` (Schulman 2020); in the loss its gradient is the KL's."""

    def estimate(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        return kl_k2(logprobs, ref_logprobs)


@KL_ESTIMATORS.register("k3")
class K3(KLEstimator):
    """``k3 = exp(d) - d - 1``, ``d = log p_ref - log p`` (Schulman 2020); GRPO's penalty in the loss."""

    def estimate(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        return kl_k3(logprobs, ref_logprobs)
