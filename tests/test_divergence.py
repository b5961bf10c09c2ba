"""A run that diverges stops with a message that says what to change, and the adapter on disk stays the last good
one: PPO through the CLI, DPO through the Trainer, each at a learning rate of 1e10 from the start (no good step, no
adapter written) and raised to 1e10 after a good, saved first step (that adapter kept byte for byte)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from test_dpo_module import fit, write_pairs
from test_ppo_module import ppo_args

from abel_lightning.callbacks.adapter_checkpoint import AdapterCheckpoint
from abel_lightning.cli import main
from abel_lightning.modules.trainable import DivergenceError

WEIGHTS = "adapter_model.safetensors"
HUGE = 1e10


class RaiseLearningRate(L.Callback):
    """After the first training batch (and the AdapterCheckpoint listed before it, which saves it), keep a copy of the
    saved adapter's weights and set the learning rate to 1e10: the next step diverges."""

    saved: bytes | None = None

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx == 0:
            RaiseLearningRate.saved = (self.dirpath / WEIGHTS).read_bytes()
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = HUGE
            for config in trainer.lr_scheduler_configs:  # DPO's warmup would set the rate back
                config.scheduler.base_lrs = [HUGE] * len(config.scheduler.base_lrs)


def ppo_diverges(tiny_model, shared_data, tmp_path, capsys, *extra: str) -> str:
    argv = ppo_args(
        tiny_model,
        shared_data,
        tmp_path,
        "--model.init_args.reward",
        "test_digits",
        "--model.init_args.target_kl",
        "null",
        "--trainer.callbacks.init_args.save_every",
        "1",
        "--trainer.limit_train_batches",
        "3",
        *extra,
    )
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training diverged at batch" in line and "Lower model.init_args.learning_rate" in line
    return line


def test_ppo_at_a_huge_learning_rate_stops_and_writes_no_adapter(tiny_model, shared_data, tmp_path, capsys):
    line = ppo_diverges(tiny_model, shared_data, tmp_path, capsys, "--model.init_args.learning_rate", str(HUGE))
    assert "batch 0" in line
    assert not (tmp_path / "adapter" / WEIGHTS).exists()


def test_ppo_diverging_after_a_good_step_keeps_that_steps_adapter(tiny_model, shared_data, tmp_path, capsys):
    RaiseLearningRate.saved = None
    extra = ["--trainer.callbacks+=test_divergence.RaiseLearningRate", "--trainer.callbacks.init_args.dirpath"]
    line = ppo_diverges(tiny_model, shared_data, tmp_path, capsys, *extra, str(tmp_path / "adapter"))
    assert "batch 1" in line
    assert RaiseLearningRate.saved is not None
    assert (tmp_path / "adapter" / WEIGHTS).read_bytes() == RaiseLearningRate.saved


def test_dpo_at_a_huge_learning_rate_stops_and_writes_no_adapter(tiny_model, tmp_path):
    from test_dpo_module import make_adapter

    start = make_adapter(tiny_model, tmp_path / "start")
    checkpoint = AdapterCheckpoint(str(tmp_path / "dpo"), save_every=1)
    with pytest.raises(DivergenceError, match="training diverged at batch 0: the trainable weights' norm"):
        fit(
            tiny_model,
            str(start),
            write_pairs(tmp_path / "pairs.jsonl"),
            3,
            callbacks=(checkpoint,),
            learning_rate=HUGE,
        )
    assert not (tmp_path / "dpo" / WEIGHTS).exists()


def test_dpo_diverging_after_a_good_step_keeps_that_steps_adapter(tiny_model, tmp_path):
    from test_dpo_module import make_adapter

    RaiseLearningRate.saved = None
    start = make_adapter(tiny_model, tmp_path / "start")
    callbacks = (AdapterCheckpoint(str(tmp_path / "dpo"), save_every=1), RaiseLearningRate(str(tmp_path / "dpo")))
    with pytest.raises(DivergenceError, match="training diverged at batch 1"):
        fit(tiny_model, str(start), write_pairs(tmp_path / "pairs.jsonl"), 3, callbacks=callbacks)
    assert RaiseLearningRate.saved is not None
    assert (tmp_path / "dpo" / WEIGHTS).read_bytes() == RaiseLearningRate.saved
