"""Policy objectives, loss aggregations and KL estimators against numbers worked by hand, and against verl's and
TRL's published formulas (written here independently) where they have the same piece."""

import math

import pytest
import torch
from torch.testing import assert_close

from abel_lightning.losses.kl import K1, K2, K3, KL_ESTIMATORS
from abel_lightning.losses.objectives import (
    GSPO,
    LOSS_AGGREGATIONS,
    POLICY_OBJECTIVES,
    ClipHigher,
    DualClip,
    PPOClip,
    SeqMeanTokenMean,
    TokenMean,
    TokenSumOverConstant,
)

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def log_of(ratios) -> torch.Tensor:
    return t([[math.log(r) for r in ratios]]).requires_grad_()


def test_registered_names():
    assert POLICY_OBJECTIVES.names() == ["clip-higher", "dual-clip", "gspo", "ppo-clip"]
    assert LOSS_AGGREGATIONS.names() == ["seq-mean-token-mean", "seq-mean-token-sum-norm", "token-mean"]
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]


def test_clip_higher_lets_a_positive_advantage_ratio_reach_one_plus_eps_high():
    logprobs = log_of([1.5, 0.5, 1.25, 0.7])
    old = torch.zeros(1, 4, dtype=F64)
    advantages = t([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=F64)
    per_token, stats = ClipHigher(eps_low=0.2, eps_high=0.28)(logprobs, old, advantages, mask)
    # max(-A rho, -A clip(rho, 0.8, 1.28)):
    #   rho 1.5,  A  1: max(-1.5, -1.28) = -1.28 clipped
    #   rho 0.5,  A -1: max( 0.5,  0.8)  =  0.8  clipped
    #   rho 1.25, A  1: max(-1.25, -1.25) = -1.25 inside (PPO's symmetric 0.2 would clip it at -1.2)
    #   rho 0.7,  A -1: max( 0.7,  0.8)  =  0.8  clipped
    assert_close(per_token, t([[-1.28, 0.8, -1.25, 0.8]]))
    assert_close(TokenMean()(per_token, mask), t(-0.2325))
    assert_close(stats.clip_fraction, t(0.75))
    # With eps_high = eps_low it is PPO's clip, number for number.
    ppo, _ = PPOClip(clip_range=0.2)(logprobs, old, advantages, mask)
    assert_close(ClipHigher(eps_low=0.2, eps_high=0.2)(logprobs, old, advantages, mask)[0], ppo)


def test_dual_clip_caps_the_loss_of_a_negative_advantage_at_c():
    logprobs = log_of([5.0, 2.0, 0.5, 5.0])
    old = torch.zeros(1, 4, dtype=F64)
    advantages = t([[-1.0, -1.0, -1.0, 1.0]])
    mask = torch.ones(1, 4, dtype=F64)
    per_token, stats = DualClip(clip_range=0.2, clip_ratio_c=3.0)(logprobs, old, advantages, mask)
    # PPO's term, then min(., -A * 3) where A < 0:
    #   rho 5,   A -1: max(5, 1.2) = 5 -> min(5, 3) = 3     (the dual clip)
    #   rho 2,   A -1: max(2, 1.2) = 2 -> min(2, 3) = 2     (unclipped)
    #   rho 0.5, A -1: max(0.5, 0.8) = 0.8 -> 0.8           (PPO's clip)
    #   rho 5,   A  1: max(-5, -1.2) = -1.2                 (positive advantage: PPO's clip only)
    assert_close(per_token, t([[3.0, 2.0, 0.8, -1.2]]))
    assert_close(stats.clip_fraction, t(0.75))
    loss = TokenMean()(per_token, mask)
    assert_close(loss, t(1.15))
    # Only the unclipped token has a gradient: d(-A rho)/dlogp = -A rho = 2, over 4 tokens.
    loss.backward()
    assert_close(logprobs.grad, t([[0.0, 0.5, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="clip_ratio_c"):
        DualClip(clip_ratio_c=1.0)


def test_dual_clip_matches_verls_formula():
    """verl's dual clip: l1 = max(-A rho, -A clip(rho)); l = where(A < 0, min(-A c, l1), l1)."""
    generator = torch.Generator().manual_seed(0)
    logprobs = torch.randn(4, 6, generator=generator, dtype=F64)
    old = torch.randn(4, 6, generator=generator, dtype=F64)
    advantages = torch.randn(4, 6, generator=generator, dtype=F64)
    ratio = torch.exp(logprobs - old)
    clipped = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 0.8, 1.2))
    expected = torch.where(advantages < 0, torch.minimum(-advantages * 3.0, clipped), clipped)
    per_token, _ = DualClip()(logprobs, old, advantages, torch.ones(4, 6))
    assert_close(per_token, expected)


def test_gspo_uses_one_ratio_per_sequence_over_its_real_tokens():
    # Row 0: token log-ratios 0.1 and 0.3 -> s = e^0.2 = 1.2214, clipped at 1 + 4e-4 for A = 1.
    # Row 1: one real token, log-ratio 3e-4 (the padding's 7.0 must not count) -> s = e^0.0003 = 1.00030005,
    #        inside [1 - 3e-4, 1 + 4e-4] for A = -1: loss 1.00030005.
    old = torch.zeros(2, 2, dtype=F64)
    logprobs = t([[0.1, 0.3], [3e-4, 7.0]]).requires_grad_()
    advantages = t([[1.0, 1.0], [-1.0, -1.0]])
    mask = t([[1, 1], [1, 0]])
    per_token, stats = GSPO()(logprobs, old, advantages, mask)
    s1 = math.exp(3e-4)
    assert_close(per_token, t([[-1.0004, -1.0004], [s1, s1]]))
    assert_close(stats.clip_fraction, t(2 / 3))
    assert_close(stats.ratio_mean, t((2 * math.exp(0.2) + s1) / 3))
    # Sequence mean of token means: (-1.0004 + s1) / 2. Gradient: row 0 clipped, none; row 1's real token gets
    # -A * s1 * (1 / 2 rows) * (1 / 1 token); the padding none.
    loss = SeqMeanTokenMean()(per_token, mask)
    assert_close(loss, t((-1.0004 + s1) / 2))
    loss.backward()
    assert_close(logprobs.grad, t([[0.0, 0.0], [s1 / 2, 0.0]]))


def test_gspo_matches_verls_sequence_ratio():
    """verl's GSPO: log s_{i,t} = logp - sg(logp) + sg(sum_t m (logp - old) / |y_i|), clamped at 10; then the clip."""
    generator = torch.Generator().manual_seed(3)
    logprobs = torch.randn(3, 5, generator=generator, dtype=F64) * 0.01
    old = torch.randn(3, 5, generator=generator, dtype=F64) * 0.01
    advantages = torch.randn(3, 1, generator=generator, dtype=F64).expand(3, 5)
    mask = t([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    sequence = ((logprobs - old) * mask).sum(-1) / mask.sum(-1)
    ratio = torch.exp(torch.clamp(logprobs - logprobs.detach() + sequence.detach().unsqueeze(-1), max=10.0))
    expected = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - 3e-4, 1 + 4e-4))
    assert_close(GSPO()(logprobs, old, advantages, mask)[0], expected)


def test_loss_aggregations_by_hand_and_against_trls_dr_grpo():
    loss = t([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # token-mean: (1 + 2 + 3 + 4) / 4; seq-mean-token-mean: (6/3 + 4/1) / 2; sum over B * L: 10 / (2 * 5) and, with
    # no constant, over the padded width 3: 10 / 6.
    assert_close(TokenMean()(loss, mask), t(2.5))
    assert_close(SeqMeanTokenMean()(loss, mask), t(3.0))
    assert_close(TokenSumOverConstant(max_tokens=5)(loss, mask), t(1.0))
    assert_close(TokenSumOverConstant()(loss, mask), t(10 / 6))
    # TRL's dr_grpo: (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length).
    assert_close(TokenSumOverConstant(max_tokens=5)(loss, mask), (loss * mask).sum() / (loss.size(0) * 5))
    # TRL's grpo: ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean().
    assert_close(SeqMeanTokenMean()(loss, mask), ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean())
    with pytest.raises(ValueError, match="max_tokens"):
        TokenSumOverConstant(max_tokens=0)


def test_kl_estimators_k2_and_clamping():
    logprobs = t([-1.0, -1.0, -2.0, -2.0])
    ref_logprobs = t([-0.5, -1.5, -1.0, -2.0])
    # logp - ref = [-0.5, 0.5, -1, 0]: k2 = half its square.
    assert_close(K2()(logprobs, ref_logprobs), t([0.125, 0.125, 0.5, 0.0]))
    # k3 (d = [0.5, -0.5, 1, 0]) = [0.1487213, 0.1065307, 0.7182818, 0], clamped at 0.5; k1 clamped at 0.6.
    assert_close(K3(clamp=0.5)(logprobs, ref_logprobs), t([0.1487212707, 0.1065306597, 0.5, 0.0]))
    assert_close(K1(clamp=0.6)(logprobs, ref_logprobs), t([-0.5, 0.5, -0.6, 0.0]))
    with pytest.raises(ValueError, match="clamp"):
        K3(clamp=0.0)


def test_k3_clamped_at_10_matches_verls_low_var_kl():
    """verl's low_var_kl: d = clamp(ref - logp, -20, 20); clamp(exp(d) - d - 1, -10, 10)."""
    logprobs = t([-1.0, -30.0, -0.1, -2.0, -0.01])
    ref_logprobs = t([-0.2, -0.5, -40.0, -2.5, -1.0])
    d = torch.clamp(ref_logprobs - logprobs, -20, 20)
    expected = torch.clamp(torch.exp(d) - d - 1, -10, 10)
    assert_close(K3(clamp=10.0)(logprobs, ref_logprobs), expected)
