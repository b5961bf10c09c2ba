"""Phase 4: DPO over LoRA on Regime W preference pairs (Rafailov et al. 2023, "Direct Preference Optimization").

One ``training_step`` on a batch of pairs:

1. reference: the summed log-probs of the chosen and rejected responses under the starting policy, looked up in a
   cache computed once before training (``reference: cached``) or computed by a frozen copy of the starting adapter
   (``reference: adapter``);
2. policy: the same log-probs under the trained policy, chosen and rejected in one forward pass;
3. loss: the preference loss ``loss`` (:mod:`abel_lightning.losses.dpo`) on the four and the response lengths.

The policy and the reference both start as ``base + adapter`` (the PPO adapter), so at step 0 the margin is 0 and the
sigmoid loss is log 2. A reference-free loss (``simpo``, ``sft``, ``orpo``) skips step 1 and the cache entirely.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from abel_lightning.data.preferences import PreferenceBatch, PreferenceDataModule
from abel_lightning.losses.dpo import DPO_LOSSES, DPOLoss, DPOOutput, PairLogps
from abel_lightning.models.loading import TRAINED_ADAPTER, LoraSettings, Quantization
from abel_lightning.models.sequences import sequence_logprobs
from abel_lightning.modules.reference_logprobs import ReferenceLogprobs, hash_files
from abel_lightning.modules.trainable import DivergenceLimits, LoRATrainingModule

log = logging.getLogger(__name__)

REFERENCES = ("cached", "adapter")
# PEFT's names: the adapter being trained, and the frozen copy of it that ``reference: adapter`` loads beside it.
REFERENCE_ADAPTER = "reference"


class DPOModule(LoRATrainingModule):
    def __init__(
        self,
        model: str = "GAIR/Abel-7B-002",
        adapter: str | None = "checkpoints/abel_ppo_lora",
        lora: LoraSettings | None = None,
        dtype: str = "bfloat16",
        quantization: Quantization | None = None,
        gradient_checkpointing: bool = True,
        loss: str | DPOLoss = "sigmoid",
        learning_rate: float = 5e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        reference: str = "cached",
        divergence: DivergenceLimits | None = None,
    ):
        """
        Args:
            model: base model: hub id, local folder, or ``builtin:toy``.
            adapter: the PEFT adapter both the policy and the reference start from (Phase 1's); None starts a fresh
                LoRA from ``lora``, and the reference is then the base model.
            lora: LoRA settings of a fresh adapter (unused when ``adapter`` is set: the folder has its own).
            dtype: dtype of the base weights (bfloat16 on GPUs, float32 on CPUs).
            quantization: ``4bit`` (QLoRA, NF4) or ``8bit`` base via bitsandbytes; None keeps ``dtype``.
            gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more time).
            loss: the preference loss, owning its hyperparameters (beta, label_smoothing...): a name registered in
                ``DPO_LOSSES`` (built with its defaults; ``sigmoid`` is DPO with beta 0.1) or a ``DPOLoss`` instance,
                in YAML ``{class_path: ..., init_args: {...}}`` to one of the package's or your own (docs/LOSSES.md).
            learning_rate: AdamW learning rate of the LoRA weights.
            weight_decay: AdamW weight decay.
            warmup_steps: optimizer steps of linear learning-rate warmup from near 0; constant afterwards.
            reference: ``cached`` (reference log-probs computed once before training and saved beside the pairs
                file) or ``adapter`` (a frozen copy of the starting adapter evaluated at every step); unused by a
                reference-free loss.
            divergence: when the run counts as diverged and stops, keeping the last good adapter (gradient norm,
                weight growth; ``kl`` is PPO's).
        """
        super().__init__(model, adapter, lora, dtype, quantization, gradient_checkpointing, divergence)
        self.save_hyperparameters()
        self.loss = DPO_LOSSES.resolve(loss)
        if reference not in REFERENCES:
            raise ValueError(f"reference {reference!r}: use one of {list(REFERENCES)}")
        # `cached` with a loss that reads the reference: filled in on_fit_start.
        self.reference: ReferenceLogprobs | None = None
        self._batch_started = 0.0

    @property
    def reference_mode(self) -> str | None:
        """``cached``, ``adapter``, or None when the loss is reference-free."""
        return self.hparams.reference if self.loss.uses_reference else None

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        super().configure_model()
        if self.reference_mode == "adapter" and self.hparams.adapter is not None:
            self.policy.load_adapter(self.hparams.adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            self.prepare_policy_for_training()

    # -- the algorithm ------------------------------------------------------------------------------------------

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        out = self.preference_loss(batch)
        if not torch.isfinite(out.loss):
            self.stop_diverged(
                f"non-finite DPO loss ({out.loss.item()}) on pairs {batch.index.tolist()} of "
                f"{self.trainer.datamodule.pairs_path} (lowering the loss's beta may help; check those pairs)"
            )
        self.log_metrics("train", out, batch)
        pairs = batch.index.numel()
        loss = out.loss.detach().float()
        self._global_batch_loss += torch.stack([loss * pairs, loss.new_tensor(float(pairs))])
        return out.loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self.log_metrics("val", self.preference_loss(batch), batch)

    def preference_loss(self, batch: PreferenceBatch) -> DPOOutput:
        # Reference first: in `adapter` mode it switches adapters, and gradient checkpointing re-runs the policy's
        # forward during backward, which must find the trained adapter active again.
        ref_chosen, ref_rejected = self.reference_logprobs(batch) if self.loss.uses_reference else (None, None)
        chosen, rejected = sequence_logprobs(self.policy, batch.sequences).chunk(2)
        chosen_tokens, rejected_tokens = batch.sequences.response_mask.sum(-1).chunk(2)
        return self.loss(PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen, ref_rejected))

    def reference_logprobs(self, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        """Summed log-probs ``[B]`` of the chosen and the rejected responses under the starting policy."""
        if self.reference_mode == "cached":
            if self.reference is None:
                raise RuntimeError(
                    "reference: cached: the reference log-probs are computed in fit; run fit, not validate"
                )
            return self.reference.lookup(batch.index)
        with torch.no_grad(), self._reference_weights():
            return sequence_logprobs(self.policy, batch.sequences).chunk(2)

    @contextmanager
    def _reference_weights(self):
        """The starting policy: the frozen copy of the starting adapter, or the base alone for a fresh LoRA."""
        if self.hparams.adapter is None:
            with self.policy.disable_adapter():
                yield
            return
        # set_adapter also sets requires_grad (inference_mode freezes all); switching back re-enables the trained one.
        self.policy.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            yield
        finally:
            self.policy.set_adapter(TRAINED_ADAPTER)

    def log_metrics(self, stage: str, out: DPOOutput, batch: PreferenceBatch) -> None:
        margin = out.chosen_rewards - out.rejected_rewards
        pairs = batch.index.numel()
        # Synced: with per-device batches of one or two pairs, a single rank's numbers say little.
        self.log_dict(
            {f"{stage}/loss": out.loss.detach(), f"{stage}/reward_accuracy": (margin > 0).float().mean()},
            prog_bar=True,
            sync_dist=True,
            batch_size=pairs,
        )
        self.log_dict(
            {
                f"{stage}/reward_margin": margin.mean(),
                f"{stage}/chosen_rewards": out.chosen_rewards.mean(),
                f"{stage}/rejected_rewards": out.rejected_rewards.mean(),
            },
            sync_dist=True,
            batch_size=pairs,
        )

    # -- before training: global batch and the reference cache ----------------------------------------------------

    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        if not isinstance(data, PreferenceDataModule):
            raise TypeError(
                "DPOModule trains on a PreferenceDataModule (data.class_path: "
                f"abel_lightning.data.preferences.PreferenceDataModule), got {type(data).__name__}"
            )
        global_batch = data.hparams.batch_size * self.trainer.accumulate_grad_batches * self.trainer.world_size
        self.print(
            f"DPO global batch: {global_batch} pairs = {data.hparams.batch_size} per device x "
            f"{self.trainer.accumulate_grad_batches} accumulated x {self.trainer.world_size} devices"
        )
        for logger in self.loggers:
            logger.log_hyperparams({"global_batch_size": global_batch})
        self._global_batch_loss = torch.zeros(2, device=self.device)  # (sum of pair losses, pairs) this step
        if self.reference_mode == "cached":
            # Before the first step the policy is the starting policy: it scores the pairs itself.
            score = partial(sequence_logprobs, self.policy)
            identity = self._reference_identity(data)
            self.reference = ReferenceLogprobs.load_or_compute(
                self, data.all_pairs, data.pairs_path, identity, score, data.hparams.batch_size
            ).to(self.device)

    def _reference_identity(self, data: PreferenceDataModule) -> dict:
        """Everything the cached numbers depend on: model, starting adapter's files, precision, served pairs."""
        hp = self.hparams
        adapter = hp.adapter and hash_files(sorted(Path(hp.adapter).glob("adapter_*")))
        return {
            "model": hp.model,
            "adapter": adapter,
            "dtype": hp.dtype,
            "quantization": hp.quantization,
            "precision": str(self.trainer.precision),
            "pairs": data.fingerprint,
        }

    # -- plumbing ------------------------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def on_before_optimizer_step(self, optimizer) -> None:
        # The loss of the whole global batch (all micro-batches on all ranks), once per optimizer step: the number to
        # compare between runs on different device counts. train/loss is the last micro-batch's, averaged over ranks.
        total, pairs = self.trainer.strategy.reduce(self._global_batch_loss, reduce_op="sum")
        self.log("train/global_batch_loss", total / pairs)
        self._global_batch_loss.zero_()

    def on_train_batch_end(self, outputs, batch: PreferenceBatch, batch_idx: int) -> None:
        # Per device, over forward, backward and (every accumulate_grad_batches) the optimizer step. Host time tracks
        # the GPU's: the finiteness check in training_step waits for the GPU once per batch.
        tokens = batch.sequences.attention_mask.sum()
        self.log(
            "train/tokens_per_s", tokens / (time.perf_counter() - self._batch_started), batch_size=batch.index.numel()
        )

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (hp.warmup_steps + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}
