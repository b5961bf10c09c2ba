"""Phase 1: PPO for correctness over LoRA (Schulman et al. 2017; the RLHF recipe of Ziegler et al. 2019).

One ``training_step`` is one PPO iteration on a batch of questions:

1. rollout: sample ``samples_per_question`` solutions per question from the current policy;
2. score: the reward of each question's group (default 1.0 for a right final answer, else 0.0);
3. evaluate: old log-probs and values (policy), reference log-probs (the same model with the adapter disabled), and
   the per-token KL between them;
4. advantage: the estimator (default GAE with the value head over KL-penalised token rewards);
5. update: ``ppo_epochs`` passes of minibatch updates of the policy objective (default PPO's clip), plus
   ``kl_coef * KL`` per token when the KL penalty is in the loss, stopped early once the approximate KL between the
   new and the old policy exceeds ``target_kl``;
6. KL control: the KL coefficient adapts towards ``kl_target`` (or stays fixed).

Each algorithmic piece (reward, advantage estimator, KL estimator, policy objective, loss aggregation) is a component
chosen by short name or by ``class_path`` (docs/EXTENDING.md).
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch

from abel_lightning.compat import attached_trainer
from abel_lightning.distributed import in_wrapped_forward, weights_sharded
from abel_lightning.losses.advantages import ADVANTAGE_ESTIMATORS, AdvantageEstimator, AdvantageInputs
from abel_lightning.losses.kl import KL_ESTIMATORS, KLEstimator
from abel_lightning.losses.objectives import LOSS_AGGREGATIONS, POLICY_OBJECTIVES, LossAggregation, PolicyObjective
from abel_lightning.losses.ppo import AdaptiveKLController, FixedKLController, masked_mean, value_loss
from abel_lightning.models.generation import SamplingSettings, generate
from abel_lightning.models.loading import LoraSettings, Quantization
from abel_lightning.models.merged_copy import MergedCopy
from abel_lightning.models.sequences import SequenceBatch, pack_completions, response_forward
from abel_lightning.models.value_head import ValueHead
from abel_lightning.modules.trainable import DivergenceLimits, LoRATrainingModule
from abel_lightning.rewards import REWARDS, GroupReward


class PPOModule(LoRATrainingModule):
    def __init__(
        self,
        model: str = "GAIR/Abel-7B-002",
        adapter: str | None = None,
        lora: LoraSettings | None = None,
        dtype: str = "bfloat16",
        quantization: Quantization | None = None,
        gradient_checkpointing: bool = True,
        sampling: SamplingSettings | None = None,
        samples_per_question: int = 1,
        reward: str | GroupReward = "correctness",
        advantage: str | AdvantageEstimator = "gae",
        policy_objective: str | PolicyObjective = "ppo-clip",
        loss_aggregation: str | LossAggregation = "token-mean",
        learning_rate: float = 5e-6,
        weight_decay: float = 0.0,
        ppo_epochs: int = 4,
        minibatch_size: int = 4,
        clip_range_value: float = 0.2,
        vf_coef: float = 0.1,
        init_kl_coef: float = 0.05,
        kl_target: float | None = 6.0,
        kl_horizon: int = 10000,
        kl_penalty: str | KLEstimator | None = None,
        kl_in: Literal["reward", "loss"] | None = None,
        target_kl: float | None = 0.1,
        max_grad_norm: float = 1.0,
        max_generation_rows: int | None = None,
        sample_merged: bool = True,
        divergence: DivergenceLimits | None = None,
    ):
        """
        Args:
            model: base model: hub id, local folder, or ``builtin:toy``.
            adapter: a PEFT adapter folder to start from; None starts a fresh LoRA from ``lora``.
            lora: LoRA settings (r, alpha, target modules) of a fresh adapter.
            dtype: dtype of the base weights (bfloat16 on GPUs, float32 on CPUs).
            quantization: ``4bit`` (QLoRA, NF4) or ``8bit`` base via bitsandbytes; None keeps ``dtype``.
            gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more time).
            sampling: temperature, top_p, max_new_tokens of the rollouts.
            samples_per_question: k solutions per question (the group estimators need k >= 2).
            reward: a reward over each question's group (``abel_lightning.rewards``): ``correctness`` (1.0 for a
                right final answer), ``regime_w`` (Regime W's coherence-shaped reward), or a ``class_path``.
            advantage: ``gae`` (value head), ``grpo``, ``rloo``, ``reinforce++``, ``reinforce++-baseline``
                (``abel_lightning.losses.advantages``), or a ``class_path``; its hyperparameters are its init_args.
            policy_objective: ``ppo-clip`` (the seed's), ``dual-clip``, ``clip-higher``, ``gspo``
                (``abel_lightning.losses.objectives``), or a ``class_path``; the clip ranges are its init_args.
            loss_aggregation: per-token loss -> scalar: ``token-mean`` (the seed's), ``seq-mean-token-mean``,
                ``seq-mean-token-sum-norm`` (Dr. GRPO), or a ``class_path``.
            learning_rate: AdamW learning rate of the LoRA (and value head) weights.
            weight_decay: AdamW weight decay.
            ppo_epochs: passes over each rollout batch.
            minibatch_size: rollout rows per optimizer step.
            clip_range_value: clipping of the value update around the old values.
            vf_coef: weight of the value loss in the joint loss.
            init_kl_coef: starting coefficient of the KL penalty against the reference policy.
            kl_target: KL (nats per sequence) the adaptive controller steers towards; None keeps the coefficient fixed.
            kl_horizon: the adaptive controller's horizon, in rollout rows.
            kl_penalty: per-token KL estimator (``abel_lightning.losses.kl``): ``k1``, ``k2``, ``k3`` or a
                ``class_path`` (init_args ``clamp``); None: ``k1`` with the KL in the reward (the seed's), ``k3`` in the
                loss (GRPO's: k1's gradient in the loss is 0 in expectation).
            kl_in: where the KL penalty goes: ``reward`` (``score - kl_coef * KL`` before the advantage) or ``loss``
                (``kl_coef * KL_t`` added to the per-token policy loss, as GRPO and TRL do); None: the estimator's
                default, ``reward`` for gae and reinforce++, ``loss`` for the group estimators grpo, rloo and
                reinforce++-baseline (so a group of equal scores carries no KL-only advantage).
            target_kl: stop an iteration's epochs once the approximate KL between new and old policy exceeds this;
                None never stops early.
            max_grad_norm: gradient clipping by global norm.
            max_generation_rows: cap on rows decoded at once (halved automatically on out-of-memory).
            sample_merged: sample from a merged copy of the policy (models/merged_copy.py): 1.6x faster decoding at
                PPO's few rows, for one more copy of the adapted weights (about 13 GB for a 7B base). Not used with
                a quantized base or sharded weights (FSDP), which cannot be merged into.
            divergence: when the run counts as diverged and stops, keeping the last good adapter (gradient norm,
                weight growth, KL from the sampling policy).
        """
        super().__init__(model, adapter, lora, dtype, quantization, gradient_checkpointing, divergence)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.sampling = sampling or SamplingSettings()
        self.reward_fn: GroupReward = REWARDS.resolve(reward)
        self.estimator: AdvantageEstimator = ADVANTAGE_ESTIMATORS.resolve(advantage)
        self.objective: PolicyObjective = POLICY_OBJECTIVES.resolve(policy_objective)
        self.aggregate: LossAggregation = LOSS_AGGREGATIONS.resolve(loss_aggregation)
        self.kl_in = kl_in or getattr(self.estimator, "kl_in", "reward")
        if self.kl_in not in ("reward", "loss"):
            raise ValueError(f"model.init_args.kl_in must be 'reward' or 'loss', got {self.kl_in!r}")
        self.kl_penalty: KLEstimator = KL_ESTIMATORS.resolve(
            kl_penalty if kl_penalty is not None else ("k1" if self.kl_in == "reward" else "k3")
        )
        self.uses_critic = bool(getattr(self.estimator, "uses_critic", False))
        self.value_head: ValueHead | None = None
        self.kl_controller = (
            AdaptiveKLController(init_kl_coef, kl_target, kl_horizon)
            if kl_target is not None
            else FixedKLController(init_kl_coef)
        )
        self._merged: MergedCopy | None = None

    def configure_model(self) -> None:
        super().configure_model()
        if self.uses_critic and self.value_head is None:
            self.value_head = ValueHead(self.policy.config.hidden_size)
            if self.hparams.adapter is not None:
                self.value_head.load(self.hparams.adapter)

    def configure_optimizers(self):
        return torch.optim.AdamW(
            self.trainable_parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )

    # -- the algorithm ------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        hp = self.hparams
        rollout, scores, gen_stats = self.rollout(batch["question"], batch["prompt"], batch["gold_answer"])
        started = time.perf_counter()
        old, values, ref_logprobs = self.evaluate(rollout)
        evaluate_seconds = time.perf_counter() - started
        mask = rollout.response_mask
        token_kl = self.kl_penalty(old.logprobs, ref_logprobs) * mask.to(old.logprobs.dtype)
        kl_coef = self.kl_controller.value
        advantages, returns = self.estimator(
            AdvantageInputs(
                scores=scores,
                kl=token_kl,
                kl_coef=kl_coef if self.kl_in == "reward" else 0.0,
                values=values,
                mask=mask,
                samples_per_question=hp.samples_per_question,
                logprobs=old.logprobs,
                ref_logprobs=ref_logprobs,
            )
        )
        started = time.perf_counter()
        loss_kl_coef = kl_coef if self.kl_in == "loss" else None
        update_stats = self.update(rollout, old.logprobs, ref_logprobs, values, advantages, returns, loss_kl_coef)
        update_seconds = time.perf_counter() - started

        kl = self.trainer.strategy.reduce(token_kl.sum(-1).mean(), reduce_op="mean")
        self.kl_controller.update(float(kl), n_steps=len(scores) * self.trainer.world_size)
        self.log_dict(
            {
                "accuracy": (scores > 0.5).float().mean(),
                "kl": kl,
                "kl_coef": self.kl_controller.value,
                "entropy": masked_mean(old.entropy, mask),
                "response_length": mask.sum(-1).mean(),
                **gen_stats,
                **update_stats,
                "evaluate_seconds": evaluate_seconds,
                "update_seconds": update_seconds,
            },
            prog_bar=False,
            sync_dist=True,
            batch_size=len(scores),
        )
        self.log("reward", scores.mean(), prog_bar=True, sync_dist=True, batch_size=len(scores))

    @torch.no_grad()
    def rollout(
        self, questions: list[str], prompts: list[str], golds: list[str]
    ) -> tuple[SequenceBatch, torch.Tensor, dict]:
        """Sample k solutions per question and score each question's group; rows come question by question."""
        k = self.hparams.samples_per_question
        started = time.perf_counter()
        self.policy.eval()
        groups = generate(
            self.sampling_model(),
            self.tokenizer,
            prompts,
            self.sampling,
            samples_per_question=k,
            max_batch_rows=self.hparams.max_generation_rows,
            synced_gpus=weights_sharded(attached_trainer(self)),
        )
        seconds = time.perf_counter() - started
        completions = [c for group in groups for c in group]
        scores = []
        for question, gold, group in zip(questions, golds, groups):
            rewards = self.reward_fn(question, [c.text for c in group], [c.num_tokens for c in group], gold)
            if len(rewards) != len(group) or not all(math.isfinite(r) for r in rewards):
                raise FloatingPointError(
                    f"reward {self.reward_fn!r} returned {rewards} for a group of {len(group)} completions: it must "
                    "return one finite float per completion"
                )
            scores += rewards
        tokens = sum(len(c.response_ids) for c in completions)
        stats = {"generation_seconds": seconds, "generation_tokens_per_s": tokens / seconds}
        rollout = pack_completions(completions, self.tokenizer.pad_token_id).to(self.device)
        return rollout, torch.tensor(scores, device=self.device), stats

    def sampling_model(self):
        """What the rollouts decode with: the merged copy, brought up to date with the LoRA weights, or the policy."""
        hp = self.hparams
        if not hp.sample_merged or hp.quantization is not None or weights_sharded(attached_trainer(self)):
            return self.policy
        if self._merged is None:  # a plain attribute, not a submodule: never saved, wrapped or optimized
            self._merged = MergedCopy(self.policy)
        return self._merged.refresh()

    @torch.no_grad()
    def evaluate(self, rollout: SequenceBatch):
        """Old-policy log-probs (and values) and reference log-probs of the sampled tokens."""
        temperature = self.sampling.temperature
        old = response_forward(self.policy, rollout, temperature, with_hidden=self.uses_critic)
        values = self.value_head(old.hidden) * rollout.response_mask if self.uses_critic else None
        # The reference policy is the base alone: the same weights with the LoRA adapter switched off.
        with self.policy.disable_adapter():
            ref = response_forward(self.policy, rollout, temperature)
        return old, values, ref.logprobs

    def update(self, rollout, old_logprobs, ref_logprobs, old_values, advantages, returns, loss_kl_coef) -> dict:
        """``ppo_epochs`` passes of minibatch steps; ``loss_kl_coef`` is the KL coefficient when the penalty is in the
        loss, None when it is in the reward."""
        hp = self.hparams
        optimizer = self.optimizers()
        self.policy.train()
        rows = rollout.input_ids.shape[0]
        step_stats: list[dict[str, torch.Tensor]] = []
        stopped_early = False
        for _ in range(hp.ppo_epochs):
            for rows_mb in torch.randperm(rows, device=self.device).split(hp.minibatch_size):
                loss, record = in_wrapped_forward(
                    self.trainer,
                    self,
                    lambda rows_mb=rows_mb: self.minibatch_loss(
                        rollout, rows_mb, old_logprobs, ref_logprobs, old_values, advantages, returns, loss_kl_coef
                    ),
                )
                if not torch.isfinite(loss):
                    self.stop_diverged(f"the PPO loss is {loss.item()} (raising model.init_args.init_kl_coef may help)")
                # Checked before stepping, as in Stable-Baselines3: a minibatch that finds the policy already too far
                # from the one that sampled is not applied. All ranks decide on the mean KL, so they stop together.
                approx_kl = self.trainer.strategy.reduce(record["approx_kl"], reduce_op="mean")
                if approx_kl > self.divergence.kl:
                    self.stop_diverged(
                        f"the policy moved by approx. KL {float(approx_kl):.3g} nats per token from the one that "
                        "sampled (limit divergence.kl)"
                    )
                if hp.target_kl is not None and approx_kl > hp.target_kl:
                    stopped_early = True
                    break
                optimizer.zero_grad()
                self.manual_backward(loss)
                self.configure_gradient_clipping(optimizer, hp.max_grad_norm, "norm")
                optimizer.step()
                self.check_weights()
                step_stats.append(record)
            if stopped_early:
                break
        self.policy.eval()
        # No step at all when the first minibatch already finds the policy past target_kl (every rank agrees).
        summary = {key: torch.stack([s[key] for s in step_stats]).mean() for key in step_stats[0]} if step_stats else {}
        summary["update_steps"] = float(len(step_stats))
        return summary

    def minibatch_loss(
        self, rollout: SequenceBatch, rows, old_logprobs, ref_logprobs, old_values, advantages, returns, loss_kl_coef
    ):
        """The policy objective's loss, aggregated over the rollout's ``rows`` (with ``loss_kl_coef * KL_t`` added per
        token when the KL penalty is in the loss), plus ``vf_coef`` times the clipped value loss, and its stats;
        ``old_values`` and ``returns`` are None without a critic."""
        hp = self.hparams
        minibatch = rollout.select(rows)
        mask = minibatch.response_mask
        out = response_forward(self.policy, minibatch, self.sampling.temperature, with_hidden=self.uses_critic)
        per_token, stats = self.objective(out.logprobs, old_logprobs[rows], advantages[rows], mask)
        record = {"clip_fraction": stats.clip_fraction, "approx_kl": stats.approx_kl.detach()}
        record["ratio_mean"] = stats.ratio_mean.detach()  # drifts from 1 as the epochs move the policy
        if loss_kl_coef is not None:
            # GRPO's KL term (Shao et al. 2024, eq. 3): the current policy against the reference, with its gradient.
            kl = self.kl_penalty(out.logprobs, ref_logprobs[rows])
            per_token = per_token + loss_kl_coef * kl
            record["kl_loss"] = masked_mean(kl.detach(), mask)
        loss = self.aggregate(per_token, mask)
        record["policy_loss"] = loss.detach()
        if self.uses_critic:
            values = self.value_head(out.hidden)
            v_loss, v_clip = value_loss(values, old_values[rows], returns[rows], mask, hp.clip_range_value)
            loss = loss + hp.vf_coef * v_loss
            record |= {"value_loss": v_loss.detach(), "value_clip_fraction": v_clip}
        return loss, record

    # -- plumbing ------------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_controller"] = self.kl_controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.kl_controller.load_state_dict(checkpoint["kl_controller"])

    def export_adapter(self, folder, state_dict: dict):
        folder = super().export_adapter(folder, state_dict)
        if self.value_head is not None:
            self.value_head.save(folder, {k: v for k, v in state_dict.items() if k.startswith("value_head.")})
        return folder
