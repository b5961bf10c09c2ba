"""What the training modules (PPO, DPO) share: a base model with a trainable LoRA adapter, saved as a PEFT folder,
and the stop on divergence that keeps the last good adapter.

Checkpoints hold only what training changes (LoRA weights, a value head, optimizer state, loop progress): the frozen
base is reloaded from its id, so a 7B run checkpoints megabytes, not 14 GB, and resumes exactly with ``--ckpt_path``.

A diverged run (non-finite or exploding gradients, weights grown far past their start, PPO's policy far past
its ``target_kl``) stops with a :class:`DivergenceError` right after the step that showed it, before anything saves: the
adapter on disk is then the last one saved from a good step (or none, when no step was good).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from abel_lightning.compat import fit_batch_index, unwrapped_name
from abel_lightning.distributed import clip_gradients, global_norm, weights_sharded
from abel_lightning.errors import ActionableError
from abel_lightning.models.loading import (
    LoraSettings,
    Quantization,
    attach_lora,
    load_base,
    load_tokenizer,
    save_adapter,
)

POLICY_PREFIX = "policy."


@dataclass
class DivergenceLimits:
    """When a training run counts as diverged and stops (``model.init_args.divergence`` in the YAML).

    Args:
        grad_norm: the gradient norm before clipping may not exceed this (a non-finite one never passes). Healthy LoRA
            runs stay below 10^3; clipping bounds the step, but a norm this large means the weights already broke.
        weight_growth: the norm of the trainable weights (LoRA, value head) may not exceed this many times its value
            when training started. A healthy run moves them by a few times at most; a learning rate 10^4 too large
            multiplies them by millions in one step.
        kl: PPO only: the approximate KL (nats per token) between the policy and the one that sampled, which ends an
            iteration's epochs early past ``target_kl``, may not exceed this: 100 times the seed's target_kl (0.1),
            a policy that jumped rather than drifted. Absolute, not a multiple, so a tiny ``target_kl`` (an early stop
            after one minibatch) is no divergence.
    """

    grad_norm: float = 1e6
    weight_growth: float = 100.0
    kl: float = 10.0


class DivergenceError(ActionableError, FloatingPointError):
    """The run diverged; the message says where, which limit it broke and what to change."""


class LoRATrainingModule(L.LightningModule):
    """Loads ``model`` (+ ``adapter`` to start from, or a fresh LoRA from ``lora``) in ``configure_model``, so that
    the strategy (DDP, FSDP) decides where the weights go."""

    def __init__(
        self,
        model: str,
        adapter: str | None,
        lora: LoraSettings | None,
        dtype: str,
        quantization: Quantization | None,
        gradient_checkpointing: bool,
        divergence: DivergenceLimits | None = None,
    ):
        super().__init__()
        self.tokenizer = load_tokenizer(model)
        # hparams may hold the settings as a plain dict (LightningCLI); keep the typed object.
        self.lora_settings = lora
        self.divergence = divergence or DivergenceLimits()
        # Set when a check fails, so that no later save (an exception callback's) writes the diverged weights.
        self.diverged = False
        self._start_weight_norm: float | None = None
        self.policy = None
        # Checkpoints carry trainable weights only; the frozen base comes from `model` again.
        self.strict_loading = False

    def setup(self, stage: str) -> None:
        if weights_sharded(self.trainer) and self.trainer.world_size == 1:
            # FSDP then runs as NO_SHARD, where PyTorch leaves frozen weights unregistered after a step: the run
            # would train, then fail to save its adapter (and a tied-embedding model fails in its first step).
            raise ValueError(
                "the FSDP strategy (configs/strategy/fsdp.yaml) needs 2 or more devices: on one it shards nothing, "
                "and PyTorch's FSDP cannot then save the LoRA weights. Set --trainer.devices to 2 or more, or use "
                "configs/strategy/ddp.yaml, or no strategy file, on one device"
            )

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        base = load_base(hp.model, hp.dtype, hp.quantization, device=self.trainer.strategy.root_device)
        self.policy = attach_lora(
            base, self.lora_settings, hp.adapter, trainable=True, gradient_checkpointing=hp.gradient_checkpointing
        )
        self.prepare_policy_for_training()

    def prepare_policy_for_training(self) -> None:
        """No dropout and train mode; call again after loading another adapter into the policy."""
        # An adapter trained elsewhere may carry dropout; see LoraSettings for why training runs without it.
        for module in self.policy.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        # PEFT loads adapters in eval mode and Lightning keeps each module's mode; Hugging Face models checkpoint
        # activations only in train mode.
        self.policy.train()

    def on_train_start(self) -> None:
        # After a resume's weights are restored: growth is measured from where this run started.
        self._start_weight_norm = float(global_norm(self.trainer, self.trainable_parameters()))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning calls this before every optimizer step (PPO calls it itself): where the raw gradient is seen.
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        norm = global_norm(self.trainer, grads)
        size = float(norm)
        if not math.isfinite(size) or size > self.divergence.grad_norm:
            self.stop_diverged(f"the gradient norm before clipping is {size:.3g} (limit divergence.grad_norm)")
        clip_gradients(self, optimizer, grads, norm, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.check_weights()

    def check_weights(self) -> None:
        """Stop if the trainable weights are non-finite or grew past ``divergence.weight_growth`` times their norm at
        the start; call after every optimizer step (automatic optimization does, through ``optimizer_step``)."""
        norm = float(global_norm(self.trainer, self.trainable_parameters()))
        start = self._start_weight_norm
        if not math.isfinite(norm) or (start and norm > self.divergence.weight_growth * start):
            self.stop_diverged(
                f"the trainable weights' norm is {norm:.3g}, {norm / start if start else math.inf:.3g} times its "
                "value at the start (limit divergence.weight_growth)"
            )

    def stop_diverged(self, what: str) -> None:
        """Raise :class:`DivergenceError` for the current training batch, marking the module so nothing saves it."""
        self.diverged = True
        raise DivergenceError(
            f"training diverged at batch {fit_batch_index(self.trainer)}: {what}. The adapter saved before this batch "
            "(if any) is kept, the diverged weights are not saved. Lower model.init_args.learning_rate (10x or more) "
            "and resume from that adapter; raise model.init_args.divergence's limit only if this growth is expected"
        )

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {unwrapped_name(name) for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def export_adapter(self, folder: str | Path, state_dict: dict) -> Path:
        """Write the PEFT adapter folder from a (gathered) module state dict; it loads on the plain base model."""
        policy_state = {k[len(POLICY_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(POLICY_PREFIX)}
        return save_adapter(self.policy, self.tokenizer, folder, state_dict=policy_state)
