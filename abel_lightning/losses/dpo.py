"""Direct preference optimisation and its variants, selectable by name from YAML (``model.init_args.loss_type: ipo``).

Every variant is a function of the implicit reward margin
``h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))``::

    loss_fn(logits [B], beta, label_smoothing) -> per-example losses [B]

Adding one: such a function with ``@register_dpo_loss("name")`` above it (see docs/LOSSES.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

DPOLossFn = Callable[[Tensor, float, float], Tensor]

DPO_LOSSES: dict[str, DPOLossFn] = {}


def register_dpo_loss(name: str) -> Callable[[DPOLossFn], DPOLossFn]:
    """Decorator: make ``fn`` selectable as ``loss_type: name``."""

    def register(fn: DPOLossFn) -> DPOLossFn:
        if name in DPO_LOSSES:
            raise ValueError(f"DPO loss {name!r} is already registered (by {DPO_LOSSES[name]})")
        DPO_LOSSES[name] = fn
        return fn

    return register


def _no_label_smoothing(name: str, label_smoothing: float) -> None:
    # A loss without a noise model would silently ignore the setting; say so instead.
    if label_smoothing != 0.0:
        raise ValueError(f"DPO loss {name!r} has no label smoothing; set label_smoothing: 0.0 or use sigmoid/robust")


@register_dpo_loss("sigmoid")
def sigmoid_loss(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7) with conservative label smoothing (Mitchell 2023, "cDPO"):
    ``-(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``; ``eps = 0`` is plain DPO."""
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)


@register_dpo_loss("ipo")
def ipo_loss(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"):
    ``(h - 1 / (2 * beta))^2``, with ``beta`` playing the paper's ``tau``.

    The paper's ``h`` uses whole-sequence log-probs, which is what ``dpo_loss`` receives; TRL averages them over
    tokens instead, so the same ``beta`` is not comparable across the two.
    """
    _no_label_smoothing("ipo", label_smoothing)
    return (logits - 1.0 / (2.0 * beta)) ** 2


@register_dpo_loss("hinge")
def hinge_loss(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """SLiC-HF calibration loss (Zhao et al. 2023), on the DPO margin: ``relu(1 - beta * h)``."""
    _no_label_smoothing("hinge", label_smoothing)
    return F.relu(1.0 - beta * logits)


@register_dpo_loss("robust")
def robust_loss(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), unbiased under labels flipped with probability eps:
    ``(-(1 - eps) * log sigmoid(beta * h) + eps * log sigmoid(-beta * h)) / (1 - 2 * eps)``, ``eps < 0.5``."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5 (the label flip rate), got {label_smoothing}")
    return (
        -(1.0 - label_smoothing) * F.logsigmoid(beta * logits) + label_smoothing * F.logsigmoid(-beta * logits)
    ) / (1.0 - 2.0 * label_smoothing)


@dataclass
class DPOOutput:
    """``loss``: scalar, the batch mean; ``chosen_rewards``, ``rejected_rewards``: ``[B]`` implicit rewards
    ``beta * (log pi - log ref)``, detached; ``losses``: ``[B]`` per-example losses (with grad)."""

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    losses: Tensor


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """The preference loss registered as ``loss_type`` on a batch of pairs.

    ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``; ``loss = mean_i loss_fn(h_i)``.
    All four inputs: ``[B]`` summed log-probs of each whole response. Unknown ``loss_type``: ValueError.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; registered: {sorted(DPO_LOSSES)}")
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps
    losses = DPO_LOSSES[loss_type](chosen_log_ratio - rejected_log_ratio, beta, label_smoothing)
    return DPOOutput(
        loss=losses.mean(),
        chosen_rewards=beta * chosen_log_ratio.detach(),
        rejected_rewards=beta * rejected_log_ratio.detach(),
        losses=losses,
    )
