import math

import pytest
import torch
from torch.testing import assert_close

from abel_lightning.losses.kl import K1, K3, KL_ESTIMATORS, kl_k1, kl_k3
from abel_lightning.losses.objectives import PPOClip, TokenMean
from abel_lightning.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    masked_mean,
    masked_var,
    masked_whiten,
    token_rewards,
    value_loss,
)

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def test_masked_mean_ignores_padding_and_reduces_along_dim():
    x = t([[1.0, 3.0], [5.0, 7.0]])
    mask = t([[1, 0], [1, 1]])
    # Whole tensor: (1 + 5 + 7) / 3 = 13/3. Per row: [1/1, (5 + 7)/2] = [1, 6].
    assert_close(masked_mean(x, mask), t(13 / 3))
    assert_close(masked_mean(x, mask, dim=1), t([1.0, 6.0]))
    # A row with no real token gives 0, not NaN.
    assert_close(masked_mean(x, t([[0, 0], [1, 1]]), dim=1), t([0.0, 6.0]))


def test_masked_var_and_whiten():
    x = t([1.0, 3.0, 5.0, 100.0])
    mask = t([1, 1, 1, 0])
    # Real entries 1, 3, 5: mean 3, squared deviations 4 + 0 + 4 = 8; unbiased 8/2 = 4, biased 8/3.
    assert_close(masked_var(x, mask), t(4.0))
    assert_close(masked_var(x, mask, unbiased=False), t(8 / 3))
    # Whitened: (x - 3) / sqrt(4) = [-1, 0, 1], padding set to 0; without shifting the mean: [-1, 0, 1] + 3.
    assert_close(masked_whiten(x, mask, eps=0.0), t([-1.0, 0.0, 1.0, 0.0]))
    assert_close(masked_whiten(x, mask, shift_mean=False, eps=0.0), t([2.0, 3.0, 4.0, 0.0]))


def test_gae_by_hand_with_right_padding():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = t([[0.5, 0.5, 0.5], [1.0, 0.5, 7.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # gamma = 1, lam = 0.5; delta_t = r_t + V_{t+1} - V_t, A_t = delta_t + 0.5 * A_{t+1}, V and A after the end = 0.
    # Row 0: delta_2 = 1 + 0 - 0.5 = 0.5 -> A_2 = 0.5
    #        delta_1 = 0 + 0.5 - 0.5 = 0 -> A_1 = 0 + 0.5 * 0.5 = 0.25
    #        delta_0 = 0 + 0.5 - 0.5 = 0 -> A_0 = 0 + 0.5 * 0.25 = 0.125
    #        R = A + V = [0.625, 0.75, 1.0]
    # Row 1 (token 2 is padding: its reward 9 and value 7 must not leak in):
    #        delta_1 = 2 + 0 - 0.5 = 1.5 -> A_1 = 1.5
    #        delta_0 = 0 + 0.5 - 1 = -0.5 -> A_0 = -0.5 + 0.5 * 1.5 = 0.25
    #        R = [0.25 + 1, 1.5 + 0.5, 0] = [1.25, 2.0, 0]
    assert_close(advantages, t([[0.125, 0.25, 0.5], [0.25, 1.5, 0.0]]))
    assert_close(returns, t([[0.625, 0.75, 1.0], [1.25, 2.0, 0.0]]))


def test_kl_estimators_by_hand():
    logprobs = t([-1.0, -1.0, -2.0, -2.0])
    ref_logprobs = t([-0.5, -1.5, -1.0, -2.0])
    # k1 = logp - ref = [-0.5, 0.5, -1, 0].
    assert_close(kl_k1(logprobs, ref_logprobs), t([-0.5, 0.5, -1.0, 0.0]))
    # k3 with d = ref - logp = [0.5, -0.5, 1, 0]: e^d - d - 1
    #   = [1.6487213 - 1.5, 0.6065307 - 0.5, 2.7182818 - 2, 0] = [0.1487213, 0.1065307, 0.7182818, 0].
    assert_close(kl_k3(logprobs, ref_logprobs), t([0.1487212707, 0.1065306597, 0.7182818285, 0.0]))
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]


def test_ppo_policy_loss_clips_only_the_optimistic_side():
    old = t([[0.0, 0.0, 0.0, 0.0, 0.0]])
    logprobs = t([[math.log(1.5), math.log(0.5), math.log(1.1), math.log(0.5), 3.0]]).requires_grad_()
    advantages = t([[1.0, -1.0, 2.0, 1.0, 5.0]])
    mask = t([[1, 1, 1, 1, 0]])
    per_token, stats = PPOClip(clip_range=0.2)(logprobs, old, advantages, mask)
    loss = TokenMean()(per_token, mask)
    # Per token, max(-A * rho, -A * clip(rho, 0.8, 1.2)):
    #   rho 1.5, A  1: max(-1.5, -1.2) = -1.2  clipped
    #   rho 0.5, A -1: max( 0.5,  0.8) =  0.8  clipped
    #   rho 1.1, A  2: max(-2.2, -2.2) = -2.2  inside the range
    #   rho 0.5, A  1: max(-0.5, -0.8) = -0.5  outside the range, but the unclipped term is the pessimistic one
    # loss = (-1.2 + 0.8 - 2.2 - 0.5) / 4 = -0.775; clip fraction 2/4; ratio mean (1.5 + 0.5 + 1.1 + 0.5) / 4 = 0.9.
    assert_close(loss, t(-0.775))
    assert_close(stats.clip_fraction, t(0.5))
    assert_close(stats.ratio_mean, t(0.9))
    # approx_kl = mean 0.5 * log(rho)^2 = 0.5 * (0.1644020 + 0.4804530 + 0.0090840 + 0.4804530) / 4 = 0.1417990.
    expected_kl = 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2 + math.log(1.1) ** 2) / 4
    assert_close(stats.approx_kl, t(expected_kl))
    assert abs(expected_kl - 0.1417990) < 1e-6
    # Gradient: clipped tokens get none; d/dlogp (-A * rho) = -A * rho / 4 for the others, padding gets none.
    loss.backward()
    assert_close(logprobs.grad, t([[0.0, 0.0, -2.0 * 1.1 / 4, -1.0 * 0.5 / 4, 0.0]]))
    assert not stats.approx_kl.requires_grad


def test_value_loss_clipping():
    values = t([[0.1, 0.5, -0.5, 4.0]]).requires_grad_()
    old_values = t([[0.0, 0.0, 0.0, 0.0]])
    returns = t([[1.0, 1.0, 1.0, 1.0]])
    mask = t([[1, 1, 1, 0]])
    loss, clip_fraction = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # V_clip = clip(V, -0.2, 0.2) = [0.1, 0.2, -0.2]; errors (V - R)^2 vs (V_clip - R)^2:
    #   0.81 vs 0.81 -> 0.81;  0.25 vs 0.64 -> 0.64 (clipped larger);  2.25 vs 1.44 -> 2.25
    # loss = 0.5 * (0.81 + 0.64 + 2.25) / 3 = 0.5 * 3.7 / 3 = 0.6166667; clip fraction 1/3.
    assert_close(loss, t(0.5 * 3.7 / 3))
    assert_close(clip_fraction, t(1 / 3))
    # Gradient 0.5 * 2 * (V - R) / 3 where the unclipped term is taken: [-0.9/3, 0, -1.5/3, 0].
    loss.backward()
    assert_close(values.grad, t([[-0.3, 0.0, -0.5, 0.0]]))


def test_adaptive_kl_controller_one_update_each_way():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 9: 9/6 - 1 = 0.5 -> clipped to 0.2; mult = 1 + 0.2 * 256 / 10000 = 1.00512; 0.2 * 1.00512 = 0.201024.
    controller.update(current_kl=9.0, n_steps=256)
    assert controller.value == pytest.approx(0.201024)
    # KL 5.4: 5.4/6 - 1 = -0.1; mult = 1 - 0.1 * 1000 / 10000 = 0.99; 0.201024 * 0.99 = 0.19901376.
    controller.update(current_kl=5.4, n_steps=1000)
    assert controller.value == pytest.approx(0.19901376)


def test_kl_controllers_resume_from_state_dict():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    controller.update(current_kl=9.0, n_steps=256)
    resumed = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.value == controller.value

    fixed = FixedKLController(0.05)
    fixed.update(current_kl=100.0, n_steps=256)
    assert fixed.value == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_token_rewards_put_the_score_on_the_last_real_token():
    scores = t([1.0, -1.0])
    logprobs = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    ref_logprobs = t([[-1.5, -1.0, -0.5], [-1.0, -2.0, -3.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    kl = K1()(logprobs, ref_logprobs) * mask
    rewards = token_rewards(scores, kl, mask, kl_coef=0.1)
    # k1 = logp - ref = [[0.5, 0, -0.5], [-1, 0, (1, padding)]] -> masked [[0.5, 0, -0.5], [-1, 0, 0]].
    # -0.1 * kl = [[-0.05, 0, 0.05], [0.1, 0, 0]]; score on the last real token: row 0 index 2, row 1 index 1:
    # [[-0.05, 0, 0.05 + 1], [0.1, 0 - 1, 0]].
    assert_close(kl, t([[0.5, 0.0, -0.5], [-1.0, 0.0, 0.0]]))
    assert_close(rewards, t([[-0.05, 0.0, 1.05], [0.1, -1.0, 0.0]]))


def test_token_rewards_with_k3_and_an_unknown_estimator():
    scores = t([0.0])
    logprobs = t([[-1.0, -2.0]])
    ref_logprobs = t([[-0.5, -3.0]])
    mask = t([[1, 1]])
    # d = ref - logp = [0.5, -1]: k3 = [e^0.5 - 1.5, e^-1 + 1 - 1] = [0.1487213, 0.3678794]; rewards = -2 * k3.
    kl = K3()(logprobs, ref_logprobs) * mask
    rewards = token_rewards(scores, kl, mask, kl_coef=2.0)
    assert_close(kl, t([[0.1487212707, 0.3678794412]]))
    assert_close(rewards, t([[-0.2974425414, -0.7357588823]]))
    with pytest.raises(ValueError, match="k1"):
        KL_ESTIMATORS.resolve("k4")
