import math

import pytest
import torch
from torch.testing import assert_close

from abel_lightning.losses.dpo import DPO_LOSSES, dpo_loss, register_dpo_loss

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def pair_with_margin_two():
    # h = (pc - rc) - (pr - rr) = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2.
    return t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0])


# With beta = 0.5, beta * h = 1: -log sigmoid(1) = log(1 + e^-1) = 0.3132617, -log sigmoid(-1) = log(1 + e) = 1.3132617.
SOFTPLUS_MINUS_ONE = math.log1p(math.exp(-1.0))
SOFTPLUS_ONE = math.log1p(math.e)


def test_sigmoid_is_log_two_when_policy_equals_reference():
    logps = t([-5.0, -7.0])
    # h = 0 -> -log sigmoid(0) = log 2 for every pair.
    output = dpo_loss(logps, logps + 1.0, logps, logps + 1.0, beta=0.1)
    assert_close(output.loss, t(math.log(2.0)))
    assert_close(output.chosen_rewards, t([0.0, 0.0]))


@pytest.mark.parametrize(
    ("loss_type", "beta", "label_smoothing", "expected"),
    [
        # -log sigmoid(1) = 0.3132617
        ("sigmoid", 0.5, 0.0, SOFTPLUS_MINUS_ONE),
        # 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.2819355 + 0.1313262 = 0.4132617
        ("sigmoid", 0.5, 0.1, 0.9 * SOFTPLUS_MINUS_ONE + 0.1 * SOFTPLUS_ONE),
        # (h - 1/(2 * 0.5))^2 = (2 - 1)^2 = 1; with beta = 1: (2 - 0.5)^2 = 2.25
        ("ipo", 0.5, 0.0, 1.0),
        ("ipo", 1.0, 0.0, 2.25),
        # relu(1 - 0.25 * 2) = 0.5; relu(1 - 1 * 2) = 0
        ("hinge", 0.25, 0.0, 0.5),
        ("hinge", 1.0, 0.0, 0.0),
        # (0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8 = (0.2819355 - 0.1313262) / 0.8 = 0.1882617
        ("robust", 0.5, 0.1, (0.9 * SOFTPLUS_MINUS_ONE - 0.1 * SOFTPLUS_ONE) / 0.8),
    ],
)
def test_each_loss_at_a_hand_computed_point(loss_type, beta, label_smoothing, expected):
    output = dpo_loss(*pair_with_margin_two(), beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    assert_close(output.loss, t(expected))
    assert_close(output.losses, t([expected]))


def test_hand_values_behind_the_table():
    assert SOFTPLUS_MINUS_ONE == pytest.approx(0.3132617)
    assert (0.9 * SOFTPLUS_MINUS_ONE + 0.1 * SOFTPLUS_ONE) == pytest.approx(0.4132617)
    assert (0.9 * SOFTPLUS_MINUS_ONE - 0.1 * SOFTPLUS_ONE) / 0.8 == pytest.approx(0.1882617)


def test_rewards_are_beta_times_log_ratios_and_detached():
    policy_chosen = t([-1.0]).requires_grad_()
    output = dpo_loss(policy_chosen, t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5)
    # chosen: 0.5 * (-1 - -2) = 0.5; rejected: 0.5 * (-3 - -2) = -0.5.
    assert_close(output.chosen_rewards, t([0.5]))
    assert_close(output.rejected_rewards, t([-0.5]))
    assert not output.chosen_rewards.requires_grad


def test_gradient_flows_to_the_policy_only():
    policy_chosen = t([-4.0]).requires_grad_()
    policy_rejected = t([-6.0]).requires_grad_()
    output = dpo_loss(policy_chosen, policy_rejected, t([-4.0]), t([-6.0]), beta=0.1)
    output.loss.backward()
    # d/dpc [-log sigmoid(beta * h)] = -beta * sigmoid(-beta * h) = -0.1 * 0.5 at h = 0; the rejected side is +0.05.
    assert_close(policy_chosen.grad, t([-0.05]))
    assert_close(policy_rejected.grad, t([0.05]))


def test_losses_without_a_noise_model_reject_label_smoothing():
    with pytest.raises(ValueError, match="label smoothing"):
        dpo_loss(*pair_with_margin_two(), loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="0.5"):
        dpo_loss(*pair_with_margin_two(), loss_type="robust", label_smoothing=0.5)


def test_unknown_loss_lists_the_registered_names():
    with pytest.raises(ValueError, match="'hinge', 'ipo', 'robust', 'sigmoid'"):
        dpo_loss(*pair_with_margin_two(), loss_type="kto")


def test_registering_a_loss_makes_it_selectable_by_name():
    @register_dpo_loss("squared_margin")
    def squared_margin(logits, beta, label_smoothing):
        return (beta * logits) ** 2

    try:
        # (0.5 * 2)^2 = 1.
        assert_close(dpo_loss(*pair_with_margin_two(), beta=0.5, loss_type="squared_margin").loss, t(1.0))
        with pytest.raises(ValueError, match="already registered"):
            register_dpo_loss("squared_margin")(squared_margin)
    finally:
        del DPO_LOSSES["squared_margin"]
