"""Saves the trained LoRA adapter as a PEFT folder every ``save_every`` training batches and at the end of ``fit``.

Beside the adapter it writes ``last.ckpt``: a Lightning checkpoint of the trainable weights, optimizer and loop
state, so ``abel-lightning fit ... --ckpt_path <dirpath>/last.ckpt`` resumes at the step where the run stopped.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

LAST = "last.ckpt"


class AdapterCheckpoint(L.Callback):
    def __init__(self, dirpath: str = "checkpoints/abel_ppo_lora", save_every: int = 500):
        self.dirpath = Path(dirpath)
        self.save_every = save_every

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Training batches seen, across epochs and resumes: a PPO iteration, or a DPO micro-batch.
        batches = trainer.fit_loop.total_batch_idx + 1
        if self.save_every > 0 and batches % self.save_every == 0:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        # Every rank takes part (FSDP gathers shards); the strategy writes on rank 0 only.
        trainer.save_checkpoint(self.dirpath / LAST)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            pl_module.export_adapter(self.dirpath, checkpoint["state_dict"])
