import pytest
import torch
from torch.testing import assert_close

from abel_lightning.losses.advantages import ADVANTAGE_ESTIMATORS, GAE, GRPO, RLOO, AdvantageEstimator, AdvantageInputs
from abel_lightning.registry import Registry

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def inputs(scores, mask, *, kl=None, kl_coef=0.0, values=None, samples_per_question=4) -> AdvantageInputs:
    """An estimator's inputs; the KL is 0 unless given, and log-probs (which the built-ins never read) are zeros."""
    zeros = torch.zeros_like(mask, dtype=F64)
    kl = zeros if kl is None else kl
    return AdvantageInputs(scores, kl, kl_coef, values, mask, samples_per_question, zeros, zeros)


def test_builtins_and_which_use_the_critic():
    assert ADVANTAGE_ESTIMATORS.names() == ["gae", "grpo", "reinforce++", "reinforce++-baseline", "rloo"]
    assert [name for name in ADVANTAGE_ESTIMATORS if ADVANTAGE_ESTIMATORS.resolve(name).uses_critic] == ["gae"]
    # Where the KL penalty goes unless the config says: group estimators keep it out of the reward.
    kl_in = {name: ADVANTAGE_ESTIMATORS.resolve(name).kl_in for name in ADVANTAGE_ESTIMATORS}
    assert kl_in == {
        "gae": "reward",
        "reinforce++": "reward",
        "grpo": "loss",
        "rloo": "loss",
        "reinforce++-baseline": "loss",
    }


def test_grpo_normalises_within_each_group_of_four():
    # Two questions, four samples each; the second has mask [1, 1, 0] rows to check the broadcast over tokens.
    scores = t([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    mask = t([[1, 1, 1]] * 4 + [[1, 1, 0]] * 4)
    advantages, returns = ADVANTAGE_ESTIMATORS.resolve("grpo")(inputs(scores, mask))
    # Group 0: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.5773503; (1 - 0.5) / 0.5773503 = 0.8660254.
    # Group 1: all equal, std 0 -> (1 - 1) / (0 + eps) = 0.
    a = 0.8660254038
    expected = t([[a] * 3, [-a] * 3, [-a] * 3, [a] * 3] + [[0.0, 0.0, 0.0]] * 4)
    assert_close(advantages, expected, atol=1e-5, rtol=0)
    assert returns is None


def test_rloo_subtracts_the_mean_of_the_other_samples():
    scores = t([1.0, 0.0, 0.0, 1.0])
    mask = t([[1, 1], [1, 1], [1, 0], [1, 1]])
    advantages, returns = RLOO()(inputs(scores, mask))
    # Group sum 2. Score 1: 1 - (2 - 1)/3 = 2/3. Score 0: 0 - (2 - 0)/3 = -2/3.
    expected = t([[2 / 3, 2 / 3], [-2 / 3, -2 / 3], [-2 / 3, 0.0], [2 / 3, 2 / 3]])
    assert_close(advantages, expected)
    assert returns is None


def test_rloo_sequence_reward_includes_the_summed_kl():
    scores = t([1.0, 1.0])
    mask = t([[1, 1], [1, 1]])
    # k1 of logp [-1, -1] against ref [-2, -2] and [-1, -1].
    kl = t([[1.0, 1.0], [0.0, 0.0]])
    advantages, _ = RLOO()(inputs(scores, mask, kl=kl, kl_coef=0.5, samples_per_question=2))
    # k1 summed: row 0: 1 + 1 = 2, row 1: 0. r = [1 - 0.5 * 2, 1 - 0] = [0, 1]. RLOO, k = 2: [0 - 1, 1 - 0].
    assert_close(advantages, t([[-1.0, -1.0], [1.0, 1.0]]))


def test_gae_estimator_whitens_the_gae_advantages():
    scores = t([1.0])
    values = t([[0.5, 0.0]])
    mask = t([[1, 1]])
    advantages, returns = GAE(gamma=1.0, lam=1.0)(inputs(scores, mask, values=values, samples_per_question=1))
    # KL 0, so rewards [0, 1]. gamma = lam = 1: A_1 = 1 - 0 = 1; A_0 = (0 + 0 - 0.5) + 1 = 0.5. R = A + V = [1, 1].
    # Whitened: mean 0.75, unbiased var (0.0625 + 0.0625) / 1 = 0.125, std 0.3535534; [-0.25, 0.25] / std.
    assert_close(advantages, t([[-0.7071067812, 0.7071067812]]), atol=1e-6, rtol=0)
    assert_close(returns, t([[1.0, 1.0]]))
    with pytest.raises(ValueError, match="values"):
        GAE()(inputs(scores, mask, samples_per_question=1))


def test_samples_per_question_must_divide_the_batch():
    with pytest.raises(ValueError, match="samples_per_question"):
        GRPO()(inputs(t([1.0, 0.0, 1.0]), torch.ones(3, 1, dtype=F64), samples_per_question=2))


def test_an_estimator_of_ones_own_is_selectable_by_name_in_its_own_registry():
    class ScoreOnly(AdvantageEstimator):
        def __call__(self, inputs):
            return inputs.per_token(inputs.scores), None

    registry = Registry("advantage estimator")
    registry.register("score_only")(ScoreOnly)
    advantages, _ = registry.resolve("score_only")(inputs(t([2.0]), t([[1, 0]]), samples_per_question=1))
    assert_close(advantages, t([[2.0, 0.0]]))
    assert not registry.resolve("score_only").uses_critic
    with pytest.raises(ValueError, match="already registered"):
        ADVANTAGE_ESTIMATORS.register("grpo")(ScoreOnly)
    with pytest.raises(ValueError, match="grpo"):
        ADVANTAGE_ESTIMATORS.resolve("score_only")


def test_grpo_scale_rewards_batch_and_none():
    scores = t([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    mask = torch.ones(8, 1, dtype=F64)
    # Group means 0.5 and 0.75: centred [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75].
    # none (Dr. GRPO): the centred rewards themselves.
    none, _ = GRPO(scale_rewards="none")(inputs(scores, mask))
    assert_close(none, t([[0.5], [-0.5], [-0.5], [0.5], [0.25], [0.25], [0.25], [-0.75]]))
    # batch: over all 8 rewards, mean 5/8, squared deviations 5 * 0.375^2 + 3 * 0.625^2 = 1.875, unbiased std
    # sqrt(1.875 / 7) = 0.5175492; 0.5 / 0.5175492 = 0.9660918, 0.25 / . = 0.4830459, -0.75 / . = -1.4491377.
    batch, _ = GRPO(scale_rewards="batch")(inputs(scores, mask))
    a, b, c = 0.9660917831, 0.4830458915, -1.4491376746
    assert_close(batch, t([[a], [-a], [-a], [a], [b], [b], [b], [c]]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="scale_rewards"):
        GRPO(scale_rewards="global")


def test_grpo_matches_trls_formula_for_every_scale_rewards():
    """TRL's GRPOTrainer: A = r - mean_group(r), divided by (std + eps) of the group or of the batch unless "none"
    (written here from its published formula, with our eps in place of TRL's 1e-4)."""
    generator = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, generator=generator, dtype=F64)
    mask = (torch.rand(12, 5, generator=generator) > 0.3).to(F64)
    grouped = rewards.view(-1, 4)
    centred = rewards - grouped.mean(dim=1).repeat_interleave(4)
    trl = {
        "group": centred / (grouped.std(dim=1).repeat_interleave(4) + 1e-6),
        "batch": centred / (rewards.std() + 1e-6),
        "none": centred,
    }
    for scale, expected in trl.items():
        advantages, _ = GRPO(scale_rewards=scale)(inputs(rewards, mask))
        assert_close(advantages, expected.unsqueeze(1) * mask)


def test_kl_in_the_reward_gives_a_uniform_group_a_unit_advantage_whatever_the_coefficient():
    """Issue 15's example: four right answers whose summed KL is [0.3, 0.6, 0.9, 1.2]. With the KL folded into the
    reward, standardising turns the KL alone into advantages of about [1.16, 0.39, -0.39, -1.16] at kl_coef 0.05 and
    still [1.16, 0.39, -0.39, -1.16] at 0.0005; with the KL in the loss (PPO passes kl_coef 0) the group carries
    none."""
    scores = t([1.0, 1.0, 1.0, 1.0])
    mask = t([[1, 1, 1]] * 4)
    kl = t([[0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [0.3, 0.3, 0.3], [0.4, 0.4, 0.4]])
    for kl_coef in (0.05, 0.0005):
        in_reward, _ = GRPO()(inputs(scores, mask, kl=kl, kl_coef=kl_coef))
        assert_close(in_reward[:, 0], t([1.1619, 0.3873, -0.3873, -1.1619]), atol=6e-3, rtol=0)
    in_loss, _ = GRPO()(inputs(scores, mask, kl=kl, kl_coef=0.0))
    assert_close(in_loss, torch.zeros(4, 3, dtype=F64))


def test_rloo_matches_openrlhfs_formula():
    """OpenRLHF's RLOO: baseline (sum of the group - r_i) / (k - 1), subtracted from r_i (written from its formula)."""
    generator = torch.Generator().manual_seed(1)
    rewards = torch.rand(8, generator=generator, dtype=F64)
    mask = torch.ones(8, 3, dtype=F64)
    grouped = rewards.view(-1, 4)
    expected = (grouped - (grouped.sum(-1, keepdim=True) - grouped) / 3).reshape(-1, 1) * mask
    assert_close(RLOO()(inputs(rewards, mask))[0], expected)


def test_reinforce_plus_plus_by_hand():
    # Token rewards -0.5 * KL, plus the score on the last token: row 0 [-0.1, -0.1 + 1], row 1 [0, -0.2 + 0].
    # Reward-to-go (gamma 1): [[0.8, 0.9], [-0.2, -0.2]]. Whitened over the 4 tokens: mean 0.325, unbiased std
    # sqrt(1.1075 / 3) = 0.6075909; (G - 0.325) / 0.6075909.
    scores = t([1.0, 0.0])
    mask = t([[1, 1], [1, 1]])
    kl = t([[0.2, 0.2], [0.0, 0.4]])
    advantages, returns = ADVANTAGE_ESTIMATORS.resolve("reinforce++")(
        inputs(scores, mask, kl=kl, kl_coef=0.5, samples_per_question=1)
    )
    assert_close(advantages, t([[0.7817760644, 0.9463604990], [-0.8640682817, -0.8640682817]]), atol=1e-6, rtol=0)
    assert returns is None


def test_reinforce_plus_plus_matches_verls_reward_to_go_loop():
    """verl's REINFORCE++: running return r_t + gamma * running, reset after each sequence's end, then masked
    whitening (written here from its published formula), with gamma 0.9 and right padding."""
    from abel_lightning.losses.advantages import ReinforcePlusPlus
    from abel_lightning.losses.ppo import masked_whiten, token_rewards

    generator = torch.Generator().manual_seed(2)
    scores = torch.rand(6, generator=generator, dtype=F64)
    kl = torch.rand(6, 5, generator=generator, dtype=F64)
    lengths = torch.tensor([5, 3, 1, 4, 5, 2])
    mask = (torch.arange(5) < lengths.unsqueeze(1)).to(F64)
    kl = kl * mask
    rewards = token_rewards(scores, kl, mask, kl_coef=0.1)
    returns = torch.zeros_like(rewards)
    running = torch.zeros(6, dtype=F64)
    for step in reversed(range(5)):
        running = rewards[:, step] + 0.9 * running
        returns[:, step] = running
        running = running * mask[:, step]
    expected = masked_whiten(returns, mask)
    advantages, _ = ReinforcePlusPlus(gamma=0.9)(inputs(scores, mask, kl=kl, kl_coef=0.1, samples_per_question=1))
    assert_close(advantages, expected)


def test_reinforce_plus_plus_baseline_subtracts_the_group_mean_then_whitens_over_the_batch():
    scores = t([1.0, 0.0, 0.0, 1.0])
    mask = t([[1, 1], [1, 0], [1, 1], [1, 1]])
    # Centred scores [0.5, -0.5, -0.5, 0.5] on every real token (7 of them): mean 1/14, unbiased std 0.5345225;
    # (0.5 - 1/14) / 0.5345225 = 0.8017837, (-0.5 - 1/14) / 0.5345225 = -1.0690450.
    advantages, returns = ADVANTAGE_ESTIMATORS.resolve("reinforce++-baseline")(inputs(scores, mask))
    a, b = 0.8017837257, -1.0690449676
    assert_close(advantages, t([[a, a], [b, 0.0], [b, b], [a, a]]), atol=1e-6, rtol=0)
    assert returns is None
