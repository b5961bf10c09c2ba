"""What the training modules (PPO, DPO) share: a base model with a trainable LoRA adapter, saved as a PEFT folder.

Checkpoints hold only what training changes (LoRA weights, a value head, optimizer state, loop progress): the frozen
base is reloaded from its id, so a 7B run checkpoints megabytes, not 14 GB, and resumes exactly with ``--ckpt_path``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from abel_lightning.compat import unwrapped_name
from abel_lightning.distributed import clip_gradients, weights_sharded
from abel_lightning.models.loading import (
    LoraSettings,
    Quantization,
    attach_lora,
    load_base,
    load_tokenizer,
    save_adapter,
)

POLICY_PREFIX = "policy."


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
    ):
        super().__init__()
        self.tokenizer = load_tokenizer(model)
        # hparams may hold the settings as a plain dict (LightningCLI); keep the typed object.
        self.lora_settings = lora
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

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, self.trainable_parameters(), gradient_clip_val, gradient_clip_algorithm)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {unwrapped_name(name) for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def export_adapter(self, folder: str | Path, state_dict: dict) -> Path:
        """Write the PEFT adapter folder from a (gathered) module state dict; it loads on the plain base model."""
        policy_state = {k[len(POLICY_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(POLICY_PREFIX)}
        return save_adapter(self.policy, self.tokenizer, folder, state_dict=policy_state)
