"""Every registered component trains: tiny DPO a couple of steps with each DPO loss, tiny PPO one iteration with each
policy objective, loss aggregation and advantage estimator, and ``reward: regime_w`` end to end. In-process
``lightning.Trainer`` on a tiny random model, seconds each; the loss must be finite and the LoRA weights must move.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from test_dpo_module import fit as dpo_fit
from test_dpo_module import write_pairs

from abel_lightning.answers import extract_answer, is_correct
from abel_lightning.data.gsm8k import GSM8KDataModule
from abel_lightning.losses.advantages import ADVANTAGE_ESTIMATORS
from abel_lightning.losses.dpo import DPO_LOSSES, WeightedLoss
from abel_lightning.losses.objectives import LOSS_AGGREGATIONS, POLICY_OBJECTIVES
from abel_lightning.modules.ppo import PPOModule
from abel_lightning.regime_w import RegimeWConfig, group_scores
from abel_lightning.rewards import GroupReward


def lora_b_moved(module: L.LightningModule) -> bool:
    """A fresh LoRA starts with every B at 0; any non-zero B means an update reached the adapter."""
    weights = [p for name, p in module.policy.named_parameters() if "lora_B" in name]
    return bool(weights) and any(p.detach().abs().max() > 0 for p in weights)


# -- DPO ---------------------------------------------------------------------------------------------------------

# Registered losses whose constructor needs arguments: built here with the smallest meaningful ones.
DPO_ARGUMENTS = {"weighted": lambda: WeightedLoss(["sigmoid", "sft"], [1.0, 0.5])}


@pytest.mark.parametrize("name", DPO_LOSSES.names())
def test_every_dpo_loss_trains_the_tiny_model(name, tiny_model, tmp_path):
    loss = DPO_ARGUMENTS[name]() if name in DPO_ARGUMENTS else name
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=6)
    module, trainer, rows = dpo_fit(tiny_model, None, pairs, steps=2, val_fraction=0.0, loss=loss)
    assert trainer.global_step == 2
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert losses and all(math.isfinite(value) for value in losses), (name, rows)
    assert lora_b_moved(module), f"{name}: the adapter did not change"


# -- PPO ---------------------------------------------------------------------------------------------------------


class Alternating(GroupReward):
    """0, 1, 0, 1, ... within every group: each group has spread, whatever a random model writes, so every estimator
    gives non-zero advantages."""

    def __call__(self, question, completions, num_tokens, gold):
        return [float(i % 2) for i in range(len(completions))]


def ppo_fit(tiny_model: str, shared_data: Path, iterations: int = 1, **module_args) -> tuple[PPOModule, L.Trainer]:
    L.seed_everything(0)
    module_args = {
        "dtype": "float32",
        "gradient_checkpointing": False,
        "sampling": None,
        "samples_per_question": 2,
        "reward": Alternating(),
        "advantage": "grpo",
        "learning_rate": 1e-2,
        "ppo_epochs": 1,
        "minibatch_size": 4,
        "target_kl": None,
        "sample_merged": False,
    } | module_args
    module = PPOModule(tiny_model, **module_args)
    module.sampling.max_new_tokens = 8
    data = GSM8KDataModule(str(shared_data / "gsm8k/train.jsonl"), n_samples=2 * iterations, batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    return module, trainer


def assert_trained(module: PPOModule, trainer: L.Trainer, label: str) -> None:
    metrics = trainer.callback_metrics
    assert float(metrics["update_steps"]) >= 1, (label, dict(metrics))
    assert math.isfinite(float(metrics["policy_loss"])), (label, dict(metrics))
    assert lora_b_moved(module), f"{label}: the adapter did not change"


@pytest.mark.parametrize("name", POLICY_OBJECTIVES.names())
def test_every_policy_objective_trains_tiny_ppo(name, tiny_model, shared_data):
    module, trainer = ppo_fit(tiny_model, shared_data, policy_objective=name)
    assert_trained(module, trainer, name)


@pytest.mark.parametrize("name", LOSS_AGGREGATIONS.names())
def test_every_loss_aggregation_trains_tiny_ppo(name, tiny_model, shared_data):
    module, trainer = ppo_fit(tiny_model, shared_data, loss_aggregation=name)
    assert_trained(module, trainer, name)


@pytest.mark.parametrize("name", ADVANTAGE_ESTIMATORS.names())
def test_every_advantage_estimator_trains_tiny_ppo(name, tiny_model, shared_data):
    module, trainer = ppo_fit(tiny_model, shared_data, advantage=name)
    assert_trained(module, trainer, name)
    assert (module.value_head is not None) == (name == "gae")


def test_regime_w_reward_trains_tiny_ppo_on_the_regime_w_reward(tiny_model, shared_data, monkeypatch):
    seen: list[tuple[list[str], list[int], str, list[float]]] = []
    original = PPOModule.rollout

    def rollout(self, questions, prompts, golds):
        # Record what the reward saw and gave, through the module's own reward function.
        reward_fn = self.reward_fn

        def recording(question, completions, num_tokens, gold):
            rewards = reward_fn(question, completions, num_tokens, gold)
            seen.append((list(completions), list(num_tokens), gold, rewards))
            return rewards

        self.reward_fn = recording
        try:
            return original(self, questions, prompts, golds)
        finally:
            self.reward_fn = reward_fn

    monkeypatch.setattr(PPOModule, "rollout", rollout)
    module, trainer = ppo_fit(tiny_model, shared_data, iterations=2, reward="regime_w", samples_per_question=3)
    assert_trained(module, trainer, "regime_w")
    assert len(seen) == 4  # 2 iterations x 2 questions
    config = RegimeWConfig()
    for completions, num_tokens, gold, rewards in seen:
        answers = [extract_answer(text) for text in completions]
        scores = group_scores(completions, answers, num_tokens, s_cf=config.s_cf, weights=config.weights)
        for answer, tokens, reward in zip(answers, num_tokens, rewards, strict=True):
            # reward_i - correct_i - beta_agreement [a_i == majority] + alpha_length n_i / 100 = beta_coherence s_wm
            agrees = reward - float(is_correct(answer, gold)) + config.alpha_length * tokens / 100
            rest = agrees - config.beta_coherence * scores.s_wm
            assert rest == pytest.approx(0.0, abs=1e-9) or rest == pytest.approx(config.beta_agreement, abs=1e-9)
    rewards = torch.tensor([r for *_, group in seen for r in group])
    assert not torch.isin(rewards, torch.tensor([0.0, 1.0])).all(), "the rewards are plain correctness"
