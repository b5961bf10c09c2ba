import pytest

from abel_lightning.regime_w import (
    S_CF,
    GroupScores,
    RegimeWConfig,
    group_scores,
    majority_answer,
    register_s_cf,
    score_group,
    trajectory_rewards,
)

# The worked example of REGIME_W.md: k = 4, gold 18, one arithmetic claim per trajectory, the third one false.
TEXTS = [
    "Each box holds 6 eggs, so 3 * 6 = 18 eggs.\nThe answer is 18.",
    "She has 9 + 9 = 18 eggs.\nThe answer is 18.",
    "She has 4 * 5 = 21 eggs, minus 1.\nThe answer is 20.",
    "She buys 10 + 8 = 18 more eggs, but how many did she have?",
]
ANSWERS = ["18", "18", "20", None]
TOKENS = [100, 120, 80, 100]
CORRECT = [True, True, False, False]


def test_worked_example_scores():
    scores = group_scores(TEXTS, ANSWERS, TOKENS)
    assert scores.s_end == pytest.approx(0.5, abs=1e-9)
    assert scores.s_path == pytest.approx(0.98, abs=1e-9)
    assert scores.s_cf == pytest.approx(0.75, abs=1e-9)
    assert scores.s_wm == pytest.approx(0.25 + 0.294 + 0.15, abs=1e-9)


def test_worked_example_rewards():
    scores = group_scores(TEXTS, ANSWERS, TOKENS)
    rewards = trajectory_rewards(CORRECT, ANSWERS, TOKENS, scores)
    # correct + 0.1*s_wm + 0.05*agrees - 0.05*tokens/100
    expected = [1 + 0.0694 + 0.05 - 0.05, 1 + 0.0694 + 0.05 - 0.06, 0.0694 - 0.04, 0.0694 - 0.05]
    assert rewards == pytest.approx(expected, abs=1e-9)
    assert rewards[0] == pytest.approx(1.0694, abs=1e-9)


def test_score_group_uses_the_config():
    scores, rewards = score_group(TEXTS, ANSWERS, TOKENS, CORRECT, RegimeWConfig())
    assert scores == group_scores(TEXTS, ANSWERS, TOKENS)
    assert rewards == trajectory_rewards(CORRECT, ANSWERS, TOKENS, scores)

    config = RegimeWConfig(
        s_cf="loo", weights=[1.0, 0.0, 0.0], beta_coherence=0.0, beta_agreement=0.0, alpha_length=0.0
    )
    scores, rewards = score_group(TEXTS, ANSWERS, TOKENS, CORRECT, config)
    assert config.weights == (1.0, 0.0, 0.0)
    assert scores.s_cf == 0.5 and scores.s_wm == 0.5
    assert rewards == [1.0, 1.0, 0.0, 0.0]


def test_no_answers_gives_zero_end_agreement_and_no_bonus():
    scores = group_scores(["no idea", "unsure"], [None, None], [50, 50])
    assert scores == GroupScores(s_end=0.0, s_path=1.0, s_cf=1.0, s_wm=0.3 + 0.2)
    assert trajectory_rewards([False, False], [None, None], [50, 50], scores, 0.0, 1.0, 0.0) == [0.0, 0.0]


def test_equal_lengths_give_full_path_consistency():
    assert group_scores(["a"] * 3, ["1", "2", "3"], [37, 37, 37]).s_path == 1.0
    assert group_scores([""], [None], [0]).s_path == 1.0  # mean 0: no spread


def test_huge_length_variance_is_clipped_to_zero():
    # mean 25, population variance (3*625 + 5625)/4 = 1875, squared CV = 3 -> clipped to 1 -> s_path 0
    assert group_scores(["a"] * 4, ["1"] * 4, [0, 0, 0, 100]).s_path == 0.0


@pytest.mark.parametrize(
    ("answers", "majority"),
    [
        (["18", "18", "20", None], "18"),
        (["20", "18", "18", "20", None], "20"),  # tie: the one seen first
        ([None, "7", "", "7"], "7"),
        ([None, "", None], None),
        ([], None),
    ],
)
def test_majority_answer(answers, majority):
    assert majority_answer(answers) == majority


def test_tied_majority_decides_agreement_and_end_score():
    answers = ["20", "18", "18", "20"]
    scores = group_scores(["t"] * 4, answers, [10] * 4)
    assert scores.s_end == 0.5
    assert trajectory_rewards([False] * 4, answers, [10] * 4, scores, 0.0, 1.0, 0.0) == [1.0, 0.0, 0.0, 1.0]


def test_loo_s_cf():
    assert S_CF.get("loo")(TEXTS, ANSWERS) == 0.5
    assert S_CF.get("loo")(["a"], ["5"]) == 0.0  # nobody else to agree with


@pytest.fixture
def constant_s_cf():
    @register_s_cf("test_constant")
    def constant(full_texts, answers):
        return 0.25

    yield constant
    S_CF.unregister("test_constant")


def test_register_custom_s_cf(constant_s_cf):
    scores = group_scores(TEXTS, ANSWERS, TOKENS, s_cf="test_constant")
    assert scores.s_cf == 0.25
    assert scores.s_wm == pytest.approx(0.25 + 0.294 + 0.05, abs=1e-9)
    with pytest.raises(ValueError, match="already registered"):
        register_s_cf("test_constant")(constant_s_cf)


def test_unknown_s_cf_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"\['arithmetic', 'loo'"):
        group_scores(TEXTS, ANSWERS, TOKENS, s_cf="nope")


def test_out_of_range_s_cf_is_an_error():
    register_s_cf("test_broken")(lambda full_texts, answers: 1.5)
    try:
        with pytest.raises(ValueError, match="outside"):
            group_scores(TEXTS, ANSWERS, TOKENS, s_cf="test_broken")
    finally:
        S_CF.unregister("test_broken")


@pytest.mark.parametrize("weights", [(0.5, 0.5, 0.5), (1.2, -0.2, 0.0), (0.5, 0.5)])
def test_weights_must_be_a_convex_combination(weights):
    with pytest.raises(ValueError, match="summing to 1"):
        group_scores(TEXTS, ANSWERS, TOKENS, weights=weights)


def test_mismatched_group_is_an_error():
    with pytest.raises(ValueError, match="one entry per trajectory"):
        group_scores(TEXTS, ANSWERS, TOKENS[:3])
    with pytest.raises(ValueError, match="at least one trajectory"):
        group_scores([], [], [])


def test_s_cf_by_dotted_path_imports_the_function(tmp_path, monkeypatch):
    (tmp_path / "mylab_cf.py").write_text("def half(full_texts, answers):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert group_scores(TEXTS, ANSWERS, TOKENS, s_cf="mylab_cf.half").s_cf == 0.5
    with pytest.raises(ValueError, match="cannot import"):
        group_scores(TEXTS, ANSWERS, TOKENS, s_cf="mylab_cf.missing")
    with pytest.raises(ValueError, match="dotted"):
        group_scores(TEXTS, ANSWERS, TOKENS, s_cf="nonesuch")
