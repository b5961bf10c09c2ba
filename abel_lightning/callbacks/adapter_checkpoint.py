"""Saves the trained LoRA adapter as a PEFT folder every ``save_every`` training batches and at the end of ``fit``.

Beside the adapter it writes ``last.ckpt``: a Lightning checkpoint of the trainable weights, optimizer and loop
state, so ``abel-lightning fit ... --ckpt_path <dirpath>/last.ckpt`` resumes at the step where the run stopped.
A module that diverged (``pl_module.diverged``, see :mod:`abel_lightning.modules.trainable`) is never saved, by this
callback or by any other checkpoint (Lightning's ``OnExceptionCheckpoint``, say), so the last good adapter stays.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from abel_lightning.compat import fit_batch_index

LAST = "last.ckpt"


class AdapterCheckpoint(L.Callback):
    def __init__(self, dirpath: str = "checkpoints/abel_ppo_lora", save_every: int = 500):
        self.dirpath = Path(dirpath)
        self.save_every = save_every
        self._saved_after_batch: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Training batches seen, across epochs and resumes: a PPO iteration, or a DPO micro-batch.
        batches = fit_batch_index(trainer) + 1
        periodic = self.save_every > 0 and batches % self.save_every == 0
        # A run that max_steps stops mid-epoch is saved here, not at on_train_end: by then Lightning counts the epoch
        # as finished, and a resume with a larger max_steps would skip the rest of the epoch's batches.
        if periodic or 0 <= trainer.max_steps <= trainer.global_step:
            self.save(trainer)
            self._saved_after_batch = batches

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._saved_after_batch != fit_batch_index(trainer) + 1:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        if getattr(trainer.lightning_module, "diverged", False):
            return
        # Every rank takes part (FSDP gathers shards); the strategy writes on rank 0 only. The full state (optimizer,
        # loops, callbacks) is what a resume needs; saying so keeps Lightning from logging that it chose it.
        trainer.save_checkpoint(self.dirpath / LAST, weights_only=False)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        if trainer.is_global_zero and not getattr(pl_module, "diverged", False):
            pl_module.export_adapter(self.dirpath, checkpoint["state_dict"])
