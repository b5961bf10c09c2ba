"""Runs Regime W rollouts and/or Platinum evaluation of a tiny model in its own process, for the tests that need one:
a DDP run (Lightning relaunches this file once per rank, which ``python -c`` cannot be) and a run that is SIGKILLed.

    python tests/policy_phase_script.py --model M --data D --rollouts R --eval-dirs E1,E2
        [--devices 2] [--phases predict,test]

``--pause-after-first-batch S`` sleeps S seconds once the first predict batch is written, so a test can kill the run at
a known point. The test phase evaluates into each of ``--eval-dirs`` in turn, one Trainer each in one process group;
rank 0 then writes ``{"platinum_accuracy": ...}`` to ``<dir>/result.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L
import torch

from abel_lightning.callbacks.platinum_eval import PlatinumEval
from abel_lightning.callbacks.regime_w import RegimeWCollector
from abel_lightning.data.gsm8k import GSM8KDataModule
from abel_lightning.models.generation import SamplingSettings
from abel_lightning.models.loading import load_base, load_tokenizer
from abel_lightning.modules.policy import PolicyModule

K = 4


def rollout_parts(
    model: str, data: str, n_samples: int, output: str
) -> tuple[PolicyModule, GSM8KDataModule, RegimeWCollector]:
    """The rollout setup every rollout test uses: k = 4 samples at temperature 1, 8 new tokens, batches of 2."""
    sampling = SamplingSettings(max_new_tokens=8, temperature=1.0)
    module = PolicyModule(model=model, dtype="float32", sampling=sampling, samples_per_question=K)
    datamodule = GSM8KDataModule(dataset=data, split="train", n_samples=n_samples, batch_size=2)
    return module, datamodule, RegimeWCollector(output=output)


def eval_parts(
    model: str, data: str, n_samples: int, output_dir: str
) -> tuple[PolicyModule, GSM8KDataModule, PlatinumEval]:
    """The evaluation setup every eval test uses: greedy, 8 new tokens, batches of 2."""
    module = PolicyModule(model=model, dtype="float32", sampling=SamplingSettings(max_new_tokens=8, temperature=0.0))
    datamodule = GSM8KDataModule(dataset=data, split="train", n_samples=n_samples, batch_size=2)
    return module, datamodule, PlatinumEval(output_dir=output_dir)


def trainer(callbacks: list, devices: int = 1, strategy: str = "auto", **options) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=callbacks,
        **options,
    )


class TinyTrainingModule(L.LightningModule):
    """Stands in for PPOModule in the in-fit tests: a ``policy`` to sample from, its ``tokenizer`` and ``sampling``."""

    def __init__(self, model: str):
        super().__init__()
        self.tokenizer = load_tokenizer(model)
        self.policy = load_base(model, "float32")
        self.sampling = SamplingSettings(max_new_tokens=8, temperature=1.0)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD([self.weight], lr=0.1)


class PauseAfterFirstBatch(L.Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            time.sleep(self.seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--n-samples", type=int, default=6)
    parser.add_argument("--rollouts", default=None)
    parser.add_argument("--eval-dirs", default="")
    parser.add_argument("--phases", default="predict")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--pause-after-first-batch", type=float, default=0.0)
    args = parser.parse_args()
    strategy = "ddp" if args.devices > 1 else "auto"

    for phase in args.phases.split(","):
        if phase == "predict":
            module, datamodule, collector = rollout_parts(args.model, args.data, args.n_samples, args.rollouts)
            callbacks = [collector]
            if args.pause_after_first_batch:
                callbacks.append(PauseAfterFirstBatch(args.pause_after_first_batch))
            trainer(callbacks, args.devices, strategy).predict(module, datamodule=datamodule, return_predictions=False)
        elif phase == "test":
            for folder in [f for f in args.eval_dirs.split(",") if f]:
                parts = eval_parts(args.model, args.data, args.n_samples, folder)
                module, datamodule, evaluation = parts
                run = trainer([evaluation], args.devices, strategy)
                run.test(module, datamodule=datamodule)
                if run.is_global_zero:
                    with open(f"{folder}/result.json", "w") as file:
                        json.dump({"platinum_accuracy": evaluation.accuracy}, file)
        else:
            raise ValueError(f"unknown phase {phase!r}: use predict and/or test")


if __name__ == "__main__":
    main()
