"""Phase 4: DPO over LoRA on Regime W preference pairs (Rafailov et al. 2023, "Direct Preference Optimization").

One ``training_step`` on a batch of pairs:

1. reference: the summed log-probs of the chosen and rejected responses under the starting policy, looked up in a
   cache computed once before training (``reference: cached``) or computed by a frozen copy of the starting adapter
   (``reference: adapter``);
2. policy: the same log-probs under the trained policy, chosen and rejected in one forward pass;
3. loss: the preference loss registered as ``loss_type`` (:mod:`abel_lightning.losses.dpo`) on the four.

The policy and the reference both start as ``base + adapter`` (the PPO adapter), so at step 0 the margin is 0 and the
sigmoid loss is log 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from abel_lightning.data.preferences import EncodedPair, PreferenceBatch, PreferenceDataModule, collate_pairs
from abel_lightning.losses.dpo import DPO_LOSSES, DPOOutput, dpo_loss
from abel_lightning.models.loading import TRAINED_ADAPTER, LoraSettings, Quantization
from abel_lightning.models.sequences import sequence_logprobs
from abel_lightning.compat import fit_batch_index
from abel_lightning.distributed import in_wrapped_forward, trainer_precision
from abel_lightning.fingerprints import update_with_file
from abel_lightning.modules.trainable import LoRATrainingModule

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
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        learning_rate: float = 5e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        reference: str = "cached",
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
            beta: DPO's beta, the strength of the implicit KL constraint to the reference.
            loss_type: a name registered in ``DPO_LOSSES``: sigmoid (DPO), ipo, hinge, robust, or your own.
            label_smoothing: the label noise rate of sigmoid (cDPO) and robust; 0 for the others.
            learning_rate: AdamW learning rate of the LoRA weights.
            weight_decay: AdamW weight decay.
            warmup_steps: optimizer steps of linear learning-rate warmup from near 0; constant afterwards.
            reference: ``cached`` (reference log-probs computed once before training and saved beside the pairs
                file) or ``adapter`` (a frozen copy of the starting adapter evaluated at every step).
        """
        super().__init__(model, adapter, lora, dtype, quantization, gradient_checkpointing)
        self.save_hyperparameters()
        if loss_type not in DPO_LOSSES:
            raise ValueError(f"loss_type {loss_type!r} is not registered; choose one of {sorted(DPO_LOSSES)}")
        if reference not in REFERENCES:
            raise ValueError(f"reference {reference!r}: use one of {list(REFERENCES)}")
        # [pairs, 2]: reference log-probs of (chosen, rejected), row = pair index in the pairs file; `cached` only.
        self.reference_logps: Tensor | None = None
        self.reference_cache: Path | None = None
        self._batch_started = 0.0

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        super().configure_model()
        if self.hparams.reference == "adapter" and self.hparams.adapter is not None:
            self.policy.load_adapter(self.hparams.adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            self.prepare_policy_for_training()

    # -- the algorithm ------------------------------------------------------------------------------------------

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        out = self.preference_loss(batch)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"non-finite DPO loss ({out.loss.item()}) at batch {fit_batch_index(self.trainer)}, pairs "
                f"{batch.index.tolist()} of {self.trainer.datamodule.pairs_path}: lower model.learning_rate or "
                "model.beta, check those pairs for empty responses, and resume from the last saved adapter"
            )
        self.log_metrics("train", out, batch)
        pairs = batch.index.numel()
        loss = out.loss.detach().float()
        self._global_batch_loss += torch.stack([loss * pairs, loss.new_tensor(float(pairs))])
        return out.loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self.log_metrics("val", self.preference_loss(batch), batch)

    def preference_loss(self, batch: PreferenceBatch) -> DPOOutput:
        hp = self.hparams
        # Reference first: in `adapter` mode it switches adapters, and gradient checkpointing re-runs the policy's
        # forward during backward, which must find the trained adapter active again.
        ref_chosen, ref_rejected = self.reference_logprobs(batch)
        chosen, rejected = sequence_logprobs(self.policy, batch.sequences).chunk(2)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, hp.beta, hp.loss_type, hp.label_smoothing)

    def reference_logprobs(self, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        """Summed log-probs ``[B]`` of the chosen and the rejected responses under the starting policy."""
        if self.hparams.reference == "cached":
            if self.reference_logps is None:
                raise RuntimeError("reference: cached: the reference log-probs are computed in fit; run fit, not validate")
            ref = self.reference_logps[batch.index]
            return ref[:, 0], ref[:, 1]
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
        if self.hparams.reference == "cached":
            self.reference_logps = self._cached_reference(data).to(self.device)

    def _cached_reference(self, data: PreferenceDataModule) -> Tensor:
        """Load the reference log-probs of ``data``'s pairs, or compute them (each rank a shard) and save them."""
        path = data.pairs_path.with_name(f"{data.pairs_path.name}.ref-{self._reference_key(data)}.pt")
        self.reference_cache = path
        # Rank 0 reads and broadcasts, so ranks agree even where the file is not on a shared file system.
        loaded = torch.load(path) if self.trainer.is_global_zero and path.exists() else None
        loaded = self.trainer.strategy.broadcast(loaded)
        if loaded is not None:
            log.info("reference log-probs: loaded %s", path)
            return loaded
        if self.trainer.ckpt_path is not None:
            raise FileNotFoundError(
                f"{path}: resuming from {self.trainer.ckpt_path} needs the reference cache written when this run "
                "started (it cannot be recomputed from trained weights); restore it, restart without --ckpt_path, or "
                "set model.init_args.reference: adapter"
            )
        started = time.perf_counter()
        world_size, rank = self.trainer.world_size, self.trainer.global_rank
        pairs = data.all_pairs[rank::world_size]
        # Shards differ in length by at most one. Every rank scores the same number of pairs (repeating one, index
        # -1), so all_gather gets equal sizes and sharded (FSDP) weights are gathered in the same forward passes.
        width = math.ceil(len(data.all_pairs) / world_size)
        padded = pairs + data.all_pairs[:1] * (width - len(pairs))
        shard = in_wrapped_forward(self.trainer, self, lambda: self._reference_rows(padded, data.hparams.batch_size))
        shard[len(pairs) :, 0] = -1
        rows = self.all_gather(shard).reshape(-1, 3).cpu()
        rows = rows[rows[:, 0] >= 0]
        logps = torch.full((int(rows[:, 0].max()) + 1, 2), float("nan"))
        logps[rows[:, 0].long()] = rows[:, 1:].float()
        if self.trainer.is_global_zero:
            _save_atomic(logps, path)
            log.info("reference log-probs of %d pairs in %.0f s: saved %s", rows.shape[0], time.perf_counter() - started, path)
        return logps

    @torch.no_grad()
    def _reference_rows(self, pairs: list[EncodedPair], batch_size: int) -> Tensor:
        """``[len(pairs), 3]`` float64 rows ``(index, chosen log-prob, rejected log-prob)`` under the current policy,
        which before the first step is the starting policy. Run in the Trainer's precision, like the training steps."""
        rows = [torch.empty(0, 3, dtype=torch.float64, device=self.device)]
        for start in range(0, len(pairs), batch_size):
            batch = collate_pairs(pairs[start : start + batch_size], self.tokenizer.pad_token_id)
            with trainer_precision(self.trainer):
                chosen, rejected = sequence_logprobs(self.policy, batch.sequences.to(self.device)).chunk(2)
            rows.append(torch.stack([batch.index.to(self.device).double(), chosen.double(), rejected.double()], -1))
        return torch.cat(rows)

    def _reference_key(self, data: PreferenceDataModule) -> str:
        """Hash of everything the cached numbers depend on: model, starting adapter's files, precision, served pairs."""
        hp = self.hparams
        adapter = hp.adapter and _hash_files(sorted(Path(hp.adapter).glob("adapter_*")))
        identity = {
            "model": hp.model,
            "adapter": adapter,
            "dtype": hp.dtype,
            "quantization": hp.quantization,
            "precision": str(self.trainer.precision),
            "pairs": data.fingerprint,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

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
        self.log("train/tokens_per_s", tokens / (time.perf_counter() - self._batch_started), batch_size=batch.index.numel())

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (hp.warmup_steps + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        update_with_file(digest, path)
    return digest.hexdigest()


def _save_atomic(tensor: Tensor, path: Path) -> None:
    """Write to a temporary file beside ``path`` and rename it, so an interrupted write never leaves a cache file."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        torch.save(tensor, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
