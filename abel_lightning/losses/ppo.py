"""PPO for language models as pure functions over per-token tensors.

Every per-token tensor is ``[B, T]`` over response tokens, right-padded; ``mask`` is 1 on real response tokens and
0 on padding (``SequenceBatch.response_mask``). Masks may be float or bool. Nothing here detaches its inputs: the
rollout side (rewards, advantages, returns) is meant to be computed under ``torch.no_grad()``.

References: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Ziegler et al. 2019 (KL-penalised reward and
the adaptive KL controller). The KL estimators are in ``kl.py``, the policy objectives in ``objectives.py``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1: ``sum(x * mask) / sum(mask)``.

    ``x``, ``mask``: same shape. ``dim=None`` gives a scalar; otherwise the mean along ``dim`` (that dim removed).
    A slice with no real entry gives 0 rather than NaN, so an empty response does not poison a batch mean.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance (scalar) of ``x`` over all entries where ``mask`` is 1.

    ``var = sum(mask * (x - mean)^2) / n``, times ``n / (n - 1)`` when ``unbiased`` (Bessel), ``n = sum(mask)``.
    Like ``torch.var``, the unbiased variance of a single entry is NaN.
    """
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` with the mean and unbiased variance of its masked entries: ``(x - mean) / sqrt(var + eps)``.

    With ``shift_mean=False`` the mean is added back, so only the scale changes. Entries where ``mask`` is 0 are
    set to 0, so padding never carries a value. ``x``, ``mask``: same shape; returns that shape.
    """
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded token sequences.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``;  ``A_t = delta_t + gamma * lam * A_{t+1}``;  ``R_t = A_t + V_t``.

    The value and advantage after a sequence's last real token count as 0 (the episode ends there), so padding
    never leaks into the real tokens whatever it holds. ``rewards``, ``values``, ``mask``: ``[B, T]``.
    Returns ``(advantages, returns)``, both ``[B, T]`` and 0 where ``mask`` is 0.
    """
    real = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    rewards = torch.where(real, rewards, zero)
    values = torch.where(real, values, zero)
    # The next token's mask is what ends the episode: A_{t+1} and V_{t+1} are dropped after the last real token.
    next_real = torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], dim=1).to(values.dtype)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        running = deltas[:, t] + gamma * lam * next_real[:, t] * running
        advantages[:, t] = running
    advantages = torch.where(real, advantages, zero)
    return advantages, advantages + values


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Clipped value loss of PPO (as in OpenAI baselines and Ziegler et al. 2019).

    ``V_clip = V_old + clip(V - V_old, -eps_v, eps_v)``;
    ``L = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)``, the mean over the batch's real tokens.

    ``values`` (with grad), ``old_values``, ``returns``, ``mask``: ``[B, T]``. Returns (scalar loss, clip fraction:
    the detached share of tokens where the clipped term was the larger one).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)
    return loss, clip_fraction


class KLController(Protocol):
    """What PPO needs of a KL coefficient: its value, an update after each rollout, and checkpointing."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: dict[str, float]) -> None: ...


class FixedKLController:
    """A KL coefficient that never changes."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt; kept so PPO calls both controllers the same way."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (section 2.2), steering the measured KL towards ``target``.

    ``e = clip(KL / target - 1, -0.2, 0.2)``;  ``beta <- beta * (1 + e * n_steps / horizon)``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target=} {horizon=}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient after a rollout of ``n_steps`` samples whose mean KL was ``current_kl``."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """KL-penalised per-token reward of Ziegler et al. 2019: ``r_t = -beta * KL_t``, plus the sequence score on the
    last real token of each row.

    ``scores``: ``[B]``; ``kl`` (a per-token estimate from ``losses/kl.py``, 0 on padding), ``mask``: ``[B, T]``.
    Returns ``[B, T]``, 0 where ``mask`` is 0. A row with no real token has nowhere to receive its score, so it gets
    none.
    """
    mask = mask.to(kl.dtype)
    positions = torch.arange(mask.shape[1], device=mask.device)
    # The largest masked-in position is the last real token; argmax keeps the first of equal maxima.
    last = (mask * positions).argmax(dim=1, keepdim=True)
    rewards = (-kl_coef * kl).scatter_add(1, last, scores.to(kl.dtype).unsqueeze(1))
    return rewards * mask
