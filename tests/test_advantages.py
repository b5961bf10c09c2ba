import pytest
import torch
from torch.testing import assert_close

from abel_lightning.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    ESTIMATORS_USING_CRITIC,
    advantage_estimator,
    register_advantage,
)

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def settings(**overrides):
    return {"group_size": 4, "kl_coef": 0.0, "gamma": 1.0, "lam": 0.95, "kl_estimator": "k1"} | overrides


def test_builtins_and_which_use_the_critic():
    assert {"gae", "grpo", "rloo"} <= set(ADVANTAGE_ESTIMATORS)
    assert ESTIMATORS_USING_CRITIC == {"gae"}


def test_grpo_normalises_within_each_group_of_four():
    # Two questions, four samples each; the second has mask [1, 1, 0] rows to check the broadcast over tokens.
    scores = t([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    logprobs = torch.zeros(8, 3, dtype=F64)
    mask = t([[1, 1, 1]] * 4 + [[1, 1, 0]] * 4)
    advantages, returns = advantage_estimator("grpo")(scores, logprobs, logprobs, None, mask, **settings())
    # Group 0: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.5773503; (1 - 0.5) / 0.5773503 = 0.8660254.
    # Group 1: all equal, std 0 -> (1 - 1) / (0 + eps) = 0.
    a = 0.8660254038
    expected = t([[a] * 3, [-a] * 3, [-a] * 3, [a] * 3] + [[0.0, 0.0, 0.0]] * 4)
    assert_close(advantages, expected, atol=1e-5, rtol=0)
    assert returns is None


def test_rloo_subtracts_the_mean_of_the_other_samples():
    scores = t([1.0, 0.0, 0.0, 1.0])
    logprobs = torch.zeros(4, 2, dtype=F64)
    mask = t([[1, 1], [1, 1], [1, 0], [1, 1]])
    advantages, returns = advantage_estimator("rloo")(scores, logprobs, logprobs, None, mask, **settings())
    # Group sum 2. Score 1: 1 - (2 - 1)/3 = 2/3. Score 0: 0 - (2 - 0)/3 = -2/3.
    expected = t([[2 / 3, 2 / 3], [-2 / 3, -2 / 3], [-2 / 3, 0.0], [2 / 3, 2 / 3]])
    assert_close(advantages, expected)
    assert returns is None


def test_rloo_sequence_reward_includes_the_summed_kl():
    scores = t([1.0, 1.0])
    logprobs = t([[-1.0, -1.0], [-1.0, -1.0]])
    ref_logprobs = t([[-2.0, -2.0], [-1.0, -1.0]])
    mask = t([[1, 1], [1, 1]])
    advantages, _ = advantage_estimator("rloo")(
        scores, logprobs, ref_logprobs, None, mask, **settings(group_size=2, kl_coef=0.5)
    )
    # k1 summed: row 0: 1 + 1 = 2, row 1: 0. r = [1 - 0.5 * 2, 1 - 0] = [0, 1]. RLOO, k = 2: [0 - 1, 1 - 0].
    assert_close(advantages, t([[-1.0, -1.0], [1.0, 1.0]]))


def test_gae_estimator_whitens_the_gae_advantages():
    scores = t([1.0])
    logprobs = t([[-1.0, -1.0]])
    values = t([[0.5, 0.0]])
    mask = t([[1, 1]])
    advantages, returns = advantage_estimator("gae")(
        scores, logprobs, logprobs, values, mask, **settings(group_size=1, lam=1.0)
    )
    # KL 0, so rewards [0, 1]. gamma = lam = 1: A_1 = 1 - 0 = 1; A_0 = (0 + 0 - 0.5) + 1 = 0.5. R = A + V = [1, 1].
    # Whitened: mean 0.75, unbiased var (0.0625 + 0.0625) / 1 = 0.125, std 0.3535534; [-0.25, 0.25] / std.
    assert_close(advantages, t([[-0.7071067812, 0.7071067812]]), atol=1e-6, rtol=0)
    assert_close(returns, t([[1.0, 1.0]]))
    with pytest.raises(ValueError, match="values"):
        advantage_estimator("gae")(scores, logprobs, logprobs, None, mask, **settings(group_size=1))


def test_group_size_must_divide_the_batch():
    scores = t([1.0, 0.0, 1.0])
    logprobs = torch.zeros(3, 1, dtype=F64)
    with pytest.raises(ValueError, match="group_size"):
        advantage_estimator("grpo")(scores, logprobs, logprobs, None, torch.ones(3, 1), **settings(group_size=2))


def test_registering_an_estimator_makes_it_selectable_by_name():
    @register_advantage("score_only")
    def score_only(scores, logprobs, ref_logprobs, values, mask, *, group_size, kl_coef, gamma, lam, kl_estimator):
        return scores.unsqueeze(1) * mask, None

    try:
        advantages, _ = advantage_estimator("score_only")(
            t([2.0]), t([[0.0, 0.0]]), t([[0.0, 0.0]]), None, t([[1, 0]]), **settings()
        )
        assert_close(advantages, t([[2.0, 0.0]]))
        assert "score_only" not in ESTIMATORS_USING_CRITIC
        with pytest.raises(ValueError, match="already registered"):
            register_advantage("score_only")(score_only)
    finally:
        del ADVANTAGE_ESTIMATORS["score_only"]
    with pytest.raises(ValueError, match="grpo"):
        advantage_estimator("score_only")
