"""Regime W's arms: allocations against hand-worked numbers, per-arm statistics, each arm's settings through a real
rollout run, and an allocation's state across a resume."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import yaml
from policy_phase_script import trainer

from abel_lightning.bandit import ALLOCATIONS, UCB, Arm, Thompson, Uniform, arm_statistics
from abel_lightning.callbacks.regime_w import RegimeWCollector
from abel_lightning.data.gsm8k import GSM8KDataModule
from abel_lightning.jsonl import read_jsonl
from abel_lightning.models.generation import SamplingSettings, generate
from abel_lightning.models.loading import load_base, load_tokenizer
from abel_lightning.modules.policy import PolicyModule
from abel_lightning.prompts import format_prompt
from abel_lightning.schemas import ROLLOUT


def observed(allocation, outcomes: list[tuple[int, bool, float]], arms: int):
    allocation.reset(arms)
    for arm, correct, reward in outcomes:
        allocation.observe(arm, correct, reward)
    return allocation


def test_uniform_gives_each_arm_its_share_round_robin():
    assert observed(Uniform(), [], 8).allocate("train/0", 8) == list(range(8))
    assert observed(Uniform(), [], 8).allocate("train/0", 16) == sorted(list(range(8)) * 2)
    assert observed(Uniform(), [], 1).allocate("train/0", 4) == [0, 0, 0, 0]  # one arm, k samples: the seed's setting
    assert observed(Uniform(), [], 3).allocate("train/0", 4) == [0, 0, 1, 2]


def test_ucb_follows_the_hand_worked_scores():
    # arm 0: 2 trajectories, mean reward 1.0; arm 1: 2, mean 0.0; arm 2: never observed.
    ucb = observed(UCB(exploration=1.0), [(0, True, 1.0), (0, True, 1.0), (1, False, 0.0), (1, False, 0.0)], 3)
    # Pick 1: arm 2 (unobserved). Counts [2, 2, 1], N = 5: arm 0 1 + sqrt(ln 5 / 2) = 1.897, arm 1 0.897,
    # arm 2 0 + sqrt(ln 5) = 1.269 -> arm 0. Counts [3, 2, 1], N = 6: 1 + sqrt(ln 6 / 3) = 1.773, 0.946, 1.339 -> arm 0.
    assert 1 + math.sqrt(math.log(6) / 3) > math.sqrt(math.log(6)) > math.sqrt(math.log(6) / 2)
    assert ucb.allocate("train/0", 3) == [0, 0, 2]
    # With a large exploration weight the uncertain arms win: counts [2, 2, 1] -> arm 2 (sqrt(ln 5) > sqrt(ln 5 / 2)).
    wide = observed(UCB(exploration=10.0), [(0, True, 1.0), (0, True, 1.0), (1, False, 0.0), (1, False, 0.0)], 3)
    assert wide.allocate("train/0", 2) == [2, 2]


def test_thompson_favours_the_accurate_arm_reproducibly_from_its_seed():
    outcomes = [(0, True, 1.0)] * 10 + [(1, False, 0.0)] * 10
    thompson = observed(Thompson(seed=3), outcomes, 3)
    # Beta(11, 1) against Beta(1, 11) and Beta(1, 1): arm 0 takes nearly every draw.
    shares = [thompson.allocate(f"train/{i}", 8).count(0) for i in range(50)]
    assert sum(shares) / (50 * 8) > 0.85

    def choices(allocation):
        return [allocation.allocate(f"train/{i}", 8) for i in range(50)]

    assert choices(observed(Thompson(seed=3), outcomes, 3)) == choices(thompson)
    assert choices(observed(Thompson(seed=4), outcomes, 3)) != choices(thompson)
    assert ALLOCATIONS.names() == ["thompson", "ucb", "uniform"]


def test_arm_statistics_of_a_hand_worked_group():
    def t(arm, answer, correct, reward, tokens):
        return {
            "arm": arm,
            "arm_name": f"a{arm}",
            "temperature": 0.1 * (arm + 2),
            "answer": answer,
            "correct": correct,
            "reward": reward,
            "num_tokens": tokens,
            "full_text": "",
        }

    records = [
        {"trajectories": [t(0, "18", True, 1.0, 100), t(1, "18", True, 0.9, 120), t(1, "20", False, 0.1, 80)]},
        {"trajectories": [t(0, None, False, -0.1, 60), t(1, "7", False, 0.0, 40), t(0, "7", False, 0.0, 20)]},
    ]
    arm0, arm1 = arm_statistics(records)
    assert (arm0["name"], arm0["samples"], arm0["accuracy"]) == ("a0", 3, 1 / 3)
    assert arm0["mean_reward"] == pytest.approx(0.3) and arm0["mean_tokens"] == pytest.approx(60)
    assert arm0["majority_share"] == pytest.approx(2 / 3)  # "18" agrees, None never does, "7" agrees
    assert arm1["temperature"] == pytest.approx(0.3)
    assert (arm1["samples"], arm1["accuracy"], arm1["majority_share"]) == (3, 1 / 3, pytest.approx(2 / 3))


def eight_arms() -> list[Arm]:
    """Eight greedy-or-sampled arms, each with something of its own: temperature, top_p, length, stop, template."""
    return [
        Arm("greedy", SamplingSettings(temperature=0.0, max_new_tokens=8)),
        Arm("short", SamplingSettings(temperature=0.0, max_new_tokens=3)),
        Arm("plain", SamplingSettings(temperature=0.0, max_new_tokens=8), prompt_template="plain"),
        Arm("stop", SamplingSettings(temperature=0.0, max_new_tokens=8, stop_strings=["e"])),
        Arm("t0.5", SamplingSettings(temperature=0.5, max_new_tokens=8)),
        Arm("t0.8", SamplingSettings(temperature=0.8, top_p=0.9, max_new_tokens=8)),
        Arm("t1.1", SamplingSettings(temperature=1.1, max_new_tokens=6)),
        Arm(None, SamplingSettings(temperature=1.4, max_new_tokens=8), prompt_template="Q: {question}\nA:"),
    ]


def rollouts(tiny_model, shared_data, output, arms, n_samples=4, **module_args) -> list[dict]:
    module = PolicyModule(model=tiny_model, dtype="float32", arms=arms, **module_args)
    data = GSM8KDataModule(
        dataset=str(shared_data / "gsm8k/train.jsonl"), split="train", n_samples=n_samples, batch_size=2
    )
    trainer([RegimeWCollector(output=str(output))]).predict(module, datamodule=data, return_predictions=False)
    return read_jsonl(output, ROLLOUT)


def test_eight_arms_decode_each_with_its_own_settings_and_are_recorded(tiny_model, shared_data, tmp_path):
    arms = eight_arms()
    records = rollouts(tiny_model, shared_data, tmp_path / "rollouts.jsonl", arms)

    tokenizer = load_tokenizer(tiny_model)
    model = load_base(tiny_model, "float32").eval()
    for record in records:
        trajectories = record["trajectories"]
        assert [t["arm"] for t in trajectories] == list(range(8))
        assert [t["arm_name"] for t in trajectories] == [a.name or "arm7" for a in arms]
        assert [t["temperature"] for t in trajectories] == [a.sampling.temperature for a in arms]
        for trajectory, arm in zip(trajectories, arms):
            assert trajectory["num_tokens"] <= arm.sampling.max_new_tokens
            if arm.sampling.greedy:
                # Decoded side by side with the other arms, each greedy arm gives what it gives alone.
                prompt = (
                    record["prompt"]
                    if arm.prompt_template is None
                    else format_prompt(record["question"], arm.prompt_template)
                )
                alone = generate(model, tokenizer, [prompt], arm.sampling)[0][0]
                assert trajectory["full_text"] == alone.text, arm.name
    # The stop arm ended early on its stop string where the greedy arm ran on.
    assert any("e" in r["trajectories"][3]["full_text"] and r["trajectories"][3]["num_tokens"] < 8 for r in records)
    assert all(r["trajectories"][1]["num_tokens"] <= 3 for r in records)
    # The template arms saw other prompts than the question's own: their greedy texts differ from the greedy arm's.
    assert any(r["trajectories"][2]["full_text"] != r["trajectories"][0]["full_text"] for r in records)
    assert (tmp_path / "rollouts_arms.png").exists()


def test_a_learning_allocation_resumes_from_the_file_as_if_never_stopped(tiny_model, shared_data, tmp_path):
    # Greedy arms of different lengths: rewards differ by arm (length penalty) and the run is deterministic.
    arms = [Arm(f"len{n}", SamplingSettings(temperature=0.0, max_new_tokens=n)) for n in (2, 8, 5)]
    whole = rollouts(
        tiny_model, shared_data, tmp_path / "whole.jsonl", arms, n_samples=6, samples_per_question=4, allocation="ucb"
    )
    choices = [[t["arm"] for t in r["trajectories"]] for r in whole]
    assert len({tuple(c) for c in choices}) > 1, "the allocation must change over the run for the test to mean much"
    assert any(len(set(c)) < len(c) for c in choices)

    # What a kill after the first batch leaves: its two records in the part file, no merged file.
    resumed = tmp_path / "resumed.jsonl"
    shutil.copy(tmp_path / "whole.jsonl", tmp_path / "first.jsonl")
    lines = (tmp_path / "first.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "resumed.jsonl.part0").write_text("".join(lines[:2]))
    again = rollouts(tiny_model, shared_data, resumed, arms, n_samples=6, samples_per_question=4, allocation="ucb")
    assert again == whole

    # Without restoring its state the allocation would choose otherwise: resume into a fresh module, no replay.
    fresh = PolicyModule(model=tiny_model, dtype="float32", arms=arms, samples_per_question=4, allocation="ucb")
    assert [fresh.allocation.allocate(r["question_id"], 4) for r in whole[2:]] != choices[2:]


@pytest.mark.parametrize("config", ["configs/rollouts.yaml", "configs/tiny/rollouts.yaml"])
def test_the_shipped_arms_give_eight_distinct_arms_and_temperatures(config, tiny_model, shared_data, tmp_path):
    root = Path(__file__).resolve().parents[1]
    shipped = yaml.safe_load((root / config).read_text())["model"]["init_args"]
    assert shipped["samples_per_question"] is None and shipped["allocation"] == "uniform"
    # The shipped settings, with fewer new tokens: a random model never stops and the test must stay short.
    arms = [
        Arm(a["name"], SamplingSettings(**{**a["sampling"], "max_new_tokens": 6}), a.get("prompt_template"))
        for a in shipped["arms"]
    ]
    records = rollouts(tiny_model, shared_data, tmp_path / "rollouts.jsonl", arms, n_samples=2)
    for record in records:
        trajectories = record["trajectories"]
        assert len(trajectories) == 8
        assert [t["arm"] for t in trajectories] == list(range(8))
        assert len({t["arm_name"] for t in trajectories}) == 8
        assert [t["temperature"] for t in trajectories] == [a.sampling.temperature for a in arms]
        assert len({t["temperature"] for t in trajectories}) == 8
