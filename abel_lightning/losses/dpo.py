"""Direct preference optimisation and its variants: one small class per published loss, each owning its
hyperparameters, selectable from YAML by a registered short name (``model.init_args.loss: ipo``) or by ``class_path``
to your own subclass of :class:`DPOLoss` (docs/EXTENDING.md).

What every loss receives, for a batch of B pairs (:class:`PairLogps`, all ``[B]``): the policy's summed log-probs of
the chosen and the rejected response (``pc``, ``pr``), the reference's (``rc``, ``rr``; None for a reference-free
loss, which then skips the reference pass and cache), and the response token counts (``nc``, ``nr``). Derived:
the log-ratios ``c = pc - rc``, ``r = pr - rr``, the margin ``h = c - r`` and the policy's mean NLL on chosen.

Formulas follow TRL's ``DPOTrainer`` (checked at huggingface/trl f2cd577, 2026-07) where TRL has the loss; where
the two conventions differ on purpose (IPO on whole-sequence sums, BCO's reward shift) the docstring says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from abel_lightning.registry import Registry


@dataclass(frozen=True)
class PairLogps:
    """The inputs of a DPO loss for B pairs; every tensor ``[B]``, row i = pair i.

    ``policy_chosen``/``policy_rejected``: summed log-probs of the responses under the policy (with grad);
    ``reference_chosen``/``reference_rejected``: the same under the reference (no grad), None when the loss is
    reference-free; ``chosen_tokens``/``rejected_tokens``: response token counts (EOS included), float.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    reference_chosen: Tensor | None = None
    reference_rejected: Tensor | None = None

    @property
    def chosen_log_ratio(self) -> Tensor:
        """``c = log pi(y_w|x) - log ref(y_w|x)``, ``[B]``."""
        return self.policy_chosen - self._reference("reference_chosen")

    @property
    def rejected_log_ratio(self) -> Tensor:
        """``r = log pi(y_l|x) - log ref(y_l|x)``, ``[B]``."""
        return self.policy_rejected - self._reference("reference_rejected")

    @property
    def margin(self) -> Tensor:
        """``h = c - r``, the implicit reward margin of DPO (before ``beta``), ``[B]``."""
        return self.chosen_log_ratio - self.rejected_log_ratio

    @property
    def chosen_mean_logp(self) -> Tensor:
        """``pc / nc``: the policy's mean log-prob per chosen token, ``[B]``."""
        return self.policy_chosen / self.chosen_tokens

    @property
    def rejected_mean_logp(self) -> Tensor:
        """``pr / nr``, ``[B]``."""
        return self.policy_rejected / self.rejected_tokens

    @property
    def chosen_nll(self) -> Tensor:
        """The policy's NLL on the chosen responses, averaged over all their tokens in the batch (a scalar):
        ``-sum_i pc_i / sum_i nc_i``, the cross-entropy TRL's ``sft`` loss and ``rpo_alpha`` use."""
        return -self.policy_chosen.sum() / self.chosen_tokens.sum()

    def _reference(self, name: str) -> Tensor:
        value = getattr(self, name)
        if value is None:
            raise ValueError(
                f"{name} is None: this loss reads the reference but declares uses_reference = False; set "
                "uses_reference = True on its class so DPOModule computes the reference log-probs"
            )
        return value


@dataclass
class DPOOutput:
    """``loss``: scalar, the batch mean; ``chosen_rewards``, ``rejected_rewards``: ``[B]`` implicit rewards (by
    default ``beta * (log pi - log ref)``), detached; ``losses``: ``[B]`` per-pair losses (with grad)."""

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    losses: Tensor


class DPOLoss:
    """A preference loss: subclasses implement :meth:`pair_losses` (``[B]`` per-pair losses) and take their
    hyperparameters as ``__init__`` arguments (so YAML can build them from ``class_path`` + ``init_args``).

    ``uses_reference = False`` makes DPOModule skip the reference pass and the reference cache entirely.
    :meth:`rewards` gives the implicit rewards that are logged (``train/reward_accuracy``, ``reward_margin``).
    """

    uses_reference: bool = True

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def pair_losses(self, x: PairLogps) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement pair_losses(x: PairLogps) -> Tensor [B]")

    def rewards(self, x: PairLogps) -> tuple[Tensor, Tensor]:
        """``(beta * c, beta * r)``; reference-free losses override this with a reward of the policy alone."""
        return self.beta * x.chosen_log_ratio, self.beta * x.rejected_log_ratio

    def __call__(self, x: PairLogps) -> DPOOutput:
        losses = self.pair_losses(x)
        chosen, rejected = self.rewards(x)
        return DPOOutput(
            loss=losses.mean(), chosen_rewards=chosen.detach(), rejected_rewards=rejected.detach(), losses=losses
        )

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({settings})"


DPO_LOSSES: Registry[type[DPOLoss]] = Registry("DPO loss")


def _smoothed_sigmoid(logits: Tensor, eps: float) -> Tensor:
    """``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``: the sigmoid loss under labels flipped with rate eps."""
    return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


@DPO_LOSSES.register("sigmoid")
class SigmoidLoss(DPOLoss):
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7): ``-log sigmoid(beta h)``; with
    ``label_smoothing = eps > 0`` the conservative DPO of Mitchell 2023 ("A note on DPO with noisy preferences"):
    ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``. The seed's default: beta 0.1, eps 0."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(
                f"sigmoid DPO needs 0 <= label_smoothing < 0.5 (the label flip rate), got {label_smoothing}"
            )
        super().__init__(beta)
        self.label_smoothing = label_smoothing

    def pair_losses(self, x: PairLogps) -> Tensor:
        return _smoothed_sigmoid(self.beta * x.margin, self.label_smoothing)


@DPO_LOSSES.register("cdpo")
class ConservativeLoss(SigmoidLoss):
    """cDPO (Mitchell 2023): the sigmoid loss with label smoothing required, ``0 < eps < 0.5``. The note fixes no
    value for eps; 0.1 is a starting point, not a recommendation from the paper."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1):
        if not 0.0 < label_smoothing < 0.5:
            raise ValueError(f"cdpo needs 0 < label_smoothing < 0.5, got {label_smoothing}; 0 is plain `sigmoid`")
        super().__init__(beta, label_smoothing)


@DPO_LOSSES.register("robust")
class RobustLoss(DPOLoss):
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), unbiased under labels flipped with rate eps:
    ``(-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)``, ``0 <= eps < 0.5``."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(
                f"robust DPO needs 0 <= label_smoothing < 0.5 (the label flip rate), got {label_smoothing}"
            )
        super().__init__(beta)
        self.label_smoothing = label_smoothing

    def pair_losses(self, x: PairLogps) -> Tensor:
        eps, z = self.label_smoothing, self.beta * x.margin
        return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


@DPO_LOSSES.register("hinge")
class HingeLoss(DPOLoss):
    """SLiC-HF calibration loss (Zhao et al. 2023), on the DPO margin: ``relu(1 - beta h)``."""

    def pair_losses(self, x: PairLogps) -> Tensor:
        return F.relu(1.0 - self.beta * x.margin)


@DPO_LOSSES.register("ipo")
class IPOLoss(DPOLoss):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    eq. 17): ``(h - 1 / (2 beta))^2`` with ``beta`` as the paper's ``tau``, on whole-sequence log-probs (the seed's
    convention). TRL averages the log-ratios over tokens first: that is ``ipo_norm``; the same beta is not
    comparable across the two."""

    def pair_losses(self, x: PairLogps) -> Tensor:
        return (x.margin - 1.0 / (2.0 * self.beta)) ** 2


@DPO_LOSSES.register("ipo_norm")
class LengthNormalizedIPOLoss(DPOLoss):
    """IPO on per-token log-ratios, TRL's ``ipo``: ``(c / nc - r / nr - 1 / (2 beta))^2``."""

    def pair_losses(self, x: PairLogps) -> Tensor:
        h = x.chosen_log_ratio / x.chosen_tokens - x.rejected_log_ratio / x.rejected_tokens
        return (h - 1.0 / (2.0 * self.beta)) ** 2


@DPO_LOSSES.register("sigmoid_norm")
class LengthNormalizedSigmoidLoss(DPOLoss):
    """DPO on per-token log-ratios (TRL's ``sigmoid_norm``): ``-log sigmoid(beta (c / nc - r / nr))``."""

    def pair_losses(self, x: PairLogps) -> Tensor:
        return -F.logsigmoid(
            self.beta * (x.chosen_log_ratio / x.chosen_tokens - x.rejected_log_ratio / x.rejected_tokens)
        )


@DPO_LOSSES.register("exo_pair")
class EXOLoss(DPOLoss):
    """EXO-pref (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", eq. 16), the
    reverse KL from ``softmax(beta (c, r))`` to the smoothed labels ``(1 - eps, eps)``, with ``q = sigmoid(beta h)``:
    ``q (log q - log(1 - eps)) + (1 - q) (log(1 - q) - log eps)``. Needs ``eps > 0``; the paper uses 1e-3."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 1e-3):
        if not 0.0 < label_smoothing < 1.0:
            raise ValueError(
                f"exo_pair needs 0 < label_smoothing < 1 (log eps appears in the loss), got {label_smoothing}"
            )
        super().__init__(beta)
        self.label_smoothing = label_smoothing

    def pair_losses(self, x: PairLogps) -> Tensor:
        z, eps = self.beta * x.margin, self.label_smoothing
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(eps)
        )


@DPO_LOSSES.register("nca_pair")
class NCALoss(DPOLoss):
    """NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards"):
    ``-log sigmoid(beta c) - 0.5 log sigmoid(-beta c) - 0.5 log sigmoid(-beta r)``."""

    def pair_losses(self, x: PairLogps) -> Tensor:
        chosen, rejected = self.beta * x.chosen_log_ratio, self.beta * x.rejected_log_ratio
        return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


@DPO_LOSSES.register("bco_pair")
class BCOLoss(DPOLoss):
    """BCO, pairwise (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment"):
    ``-log sigmoid(beta c - delta) - log sigmoid(-(beta r - delta))``, with the reward shift ``delta``.

    ``running_shift: true`` (the paper, and TRL until its 2026 DPO refactor): ``delta`` is the running mean, over the
    training batches so far including this one, of each batch's mean implicit reward ``mean(beta c, beta r)``; it
    moves only when gradients are on, so validation reads it without changing it. The state lives in this object:
    per process (under DDP each rank averages its own batches) and not in checkpoints (a resumed run starts it
    afresh). ``running_shift: false`` is TRL's current ``bco_pair``, ``delta = 0``.
    """

    def __init__(self, beta: float = 0.1, running_shift: bool = True):
        super().__init__(beta)
        self.running_shift = running_shift
        self._shift_sum = 0.0
        self._shift_batches = 0

    def shift(self, chosen_rewards: Tensor, rejected_rewards: Tensor) -> float:
        """``delta`` for this batch (updating the running mean first when training)."""
        if not self.running_shift:
            return 0.0
        if torch.is_grad_enabled():
            self._shift_sum += torch.cat([chosen_rewards, rejected_rewards]).mean().item()
            self._shift_batches += 1
        return self._shift_sum / self._shift_batches if self._shift_batches else 0.0

    def pair_losses(self, x: PairLogps) -> Tensor:
        chosen, rejected = self.beta * x.chosen_log_ratio, self.beta * x.rejected_log_ratio
        delta = self.shift(chosen.detach(), rejected.detach())
        return -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))


@DPO_LOSSES.register("sppo_hard")
class SPPOHardLoss(DPOLoss):
    """SPPO with hard win probabilities (Wu et al. 2024, "Self-Play Preference Optimization", eq. 4.7 with
    ``P(y_w > y_l) = 1``): ``(c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2``."""

    def pair_losses(self, x: PairLogps) -> Tensor:
        return (x.chosen_log_ratio - 0.5 / self.beta) ** 2 + (x.rejected_log_ratio + 0.5 / self.beta) ** 2


@DPO_LOSSES.register("aot")
class AOTLoss(DPOLoss):
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"): the
    smoothed sigmoid loss on ``sort(pc - pr) - sort(rc - rr)``, the two sorted over the batch (per device: with
    batches of one pair it is plain DPO)."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        super().__init__(beta)
        self.label_smoothing = label_smoothing

    def pair_losses(self, x: PairLogps) -> Tensor:
        policy = torch.sort(x.policy_chosen - x.policy_rejected).values
        reference = torch.sort(x.reference_chosen - x.reference_rejected).values
        return _smoothed_sigmoid(self.beta * (policy - reference), self.label_smoothing)


@DPO_LOSSES.register("aot_unpaired")
class UnpairedAOTLoss(DPOLoss):
    """AOT, unpaired (Melnyk et al. 2024): the smoothed sigmoid loss on ``sort(c) - sort(r)`` over the batch."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        super().__init__(beta)
        self.label_smoothing = label_smoothing

    def pair_losses(self, x: PairLogps) -> Tensor:
        delta = torch.sort(x.chosen_log_ratio).values - torch.sort(x.rejected_log_ratio).values
        return _smoothed_sigmoid(self.beta * delta, self.label_smoothing)


@DPO_LOSSES.register("apo_zero")
class APOZeroLoss(DPOLoss):
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", eq. 7), for chosen responses better
    than the policy's own: ``1 - sigmoid(beta c) + sigmoid(beta r)``."""

    def pair_losses(self, x: PairLogps) -> Tensor:
        return 1.0 - torch.sigmoid(self.beta * x.chosen_log_ratio) + torch.sigmoid(self.beta * x.rejected_log_ratio)


@DPO_LOSSES.register("apo_down")
class APODownLoss(DPOLoss):
    """APO-down (D'Oosterlinck et al. 2024, eq. 8), for chosen responses worse than the policy's own:
    ``sigmoid(beta c) + 1 - sigmoid(beta h)``."""

    def pair_losses(self, x: PairLogps) -> Tensor:
        return torch.sigmoid(self.beta * x.chosen_log_ratio) + 1.0 - torch.sigmoid(self.beta * x.margin)


@DPO_LOSSES.register("discopop")
class DiscoPOPLoss(DPOLoss):
    """DiscoPOP (Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for LLMs", eq. 5),
    the log-ratio modulated loss: with ``z = beta h`` and ``m = sigmoid(z / tau)``:
    ``(1 - m) (-log sigmoid(z)) + m exp(-z)``; the paper's ``tau = 0.05``."""

    def __init__(self, beta: float = 0.1, tau: float = 0.05):
        super().__init__(beta)
        self.tau = tau

    def pair_losses(self, x: PairLogps) -> Tensor:
        z = self.beta * x.margin
        modulation = torch.sigmoid(z / self.tau)
        return (1.0 - modulation) * -F.logsigmoid(z) + modulation * torch.exp(-z)


def _mean_logp_rewards(beta: float, x: PairLogps) -> tuple[Tensor, Tensor]:
    # Reference-free losses: the policy's own length-normalised reward, SimPO's ``beta / |y| log pi(y|x)``.
    return beta * x.chosen_mean_logp, beta * x.rejected_mean_logp


@DPO_LOSSES.register("sft")
class SFTLoss(DPOLoss):
    """Supervised fine-tuning on the chosen responses, reference-free: the NLL per chosen token over the batch,
    ``-sum_i pc_i / sum_i nc_i``, on every row (TRL's ``sft``; the generation term of MPO). Logged rewards: the
    policy's mean log-prob per token of each response."""

    uses_reference = False

    def __init__(self):
        super().__init__(beta=1.0)

    def pair_losses(self, x: PairLogps) -> Tensor:
        return x.chosen_nll.expand_as(x.policy_chosen)

    def rewards(self, x: PairLogps) -> tuple[Tensor, Tensor]:
        return _mean_logp_rewards(1.0, x)


@DPO_LOSSES.register("simpo")
class SimPOLoss(DPOLoss):
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6),
    reference-free and length-normalised with a target margin ``gamma``:
    ``-log sigmoid(beta pc / nc - beta pr / nr - gamma)``. Defaults: the paper's beta 2.0 with ``gamma / beta = 0.5``.
    Logged rewards: ``beta pc / nc``, ``beta pr / nr``."""

    uses_reference = False

    def __init__(self, beta: float = 2.0, gamma: float = 1.0):
        super().__init__(beta)
        self.gamma = gamma

    def pair_losses(self, x: PairLogps) -> Tensor:
        chosen, rejected = self.rewards(x)
        return -F.logsigmoid(chosen - rejected - self.gamma)

    def rewards(self, x: PairLogps) -> tuple[Tensor, Tensor]:
        return _mean_logp_rewards(self.beta, x)


@DPO_LOSSES.register("orpo")
class ORPOLoss(DPOLoss):
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eq. 6-7),
    reference-free: with ``a = pc / nc``, ``b = pr / nr`` and log-odds ``o(a) = a - log(1 - exp(a))``:
    ``nll_i - beta log sigmoid(o(a) - o(b))``, ``nll_i = -a`` (the pair's own chosen NLL per token); ``beta`` is the
    paper's ``lambda`` (TRL's ORPOTrainer default 0.1). Logged rewards: ``beta pc / nc``, ``beta pr / nr``."""

    uses_reference = False

    def pair_losses(self, x: PairLogps) -> Tensor:
        a, b = x.chosen_mean_logp, x.rejected_mean_logp
        log_odds = (a - b) - (torch.log1p(-torch.exp(a)) - torch.log1p(-torch.exp(b)))
        return -a - self.beta * F.logsigmoid(log_odds)

    def rewards(self, x: PairLogps) -> tuple[Tensor, Tensor]:
        return _mean_logp_rewards(self.beta, x)


@DPO_LOSSES.register("rpo")
class RPOLoss(DPOLoss):
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 1): a preference loss plus
    ``alpha`` times the pair's NLL per chosen token, ``loss_i + alpha (-pc_i / nc_i)``. ``preference`` is any DPO
    loss (default sigmoid). TRL's ``rpo_alpha`` averages the NLL over the batch's chosen tokens instead; that is
    ``weighted`` of ``[sigmoid, sft]`` with weights ``[1, alpha]``. Equal when the chosen lengths are equal."""

    def __init__(self, preference: str | DPOLoss = "sigmoid", alpha: float = 1.0):
        self.preference = DPO_LOSSES.resolve(preference)
        self.alpha = alpha
        self.uses_reference = self.preference.uses_reference
        super().__init__(self.preference.beta)

    def pair_losses(self, x: PairLogps) -> Tensor:
        return self.preference.pair_losses(x) - self.alpha * x.chosen_mean_logp

    def rewards(self, x: PairLogps) -> tuple[Tensor, Tensor]:
        return self.preference.rewards(x)


@DPO_LOSSES.register("weighted")
class WeightedLoss(DPOLoss):
    """A weighted sum of losses (TRL's ``loss_type`` list with ``loss_weights``; e.g. MPO = sigmoid + bco_pair +
    sft): ``sum_k w_k loss_k``, per pair, so the batch mean is ``sum_k w_k mean(loss_k)``. Weights default to 1.
    It reads the reference when any part does; the logged rewards are the first part's."""

    def __init__(self, losses: list[str | DPOLoss], weights: list[float] | None = None):
        if not losses:
            raise ValueError("weighted: give at least one loss in `losses`")
        weights = [1.0] * len(losses) if weights is None else weights
        if len(weights) != len(losses):
            raise ValueError(f"weighted: {len(weights)} weights for {len(losses)} losses; give one weight per loss")
        self.losses = [DPO_LOSSES.resolve(loss) for loss in losses]
        self.weights = list(weights)
        self.uses_reference = any(loss.uses_reference for loss in self.losses)
        super().__init__(self.losses[0].beta)

    def pair_losses(self, x: PairLogps) -> Tensor:
        return sum(weight * loss.pair_losses(x) for weight, loss in zip(self.weights, self.losses, strict=True))

    def rewards(self, x: PairLogps) -> tuple[Tensor, Tensor]:
        return self.losses[0].rewards(x)
