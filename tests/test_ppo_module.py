"""PPO end to end on a tiny random model through the CLI: adapter folder, resume, early stop on target_kl, learning,
statistics over ranks.

Run as a script, this file is the CLI with this file's rewards registered, for the DDP test (Lightning relaunches the
script once per rank, which ``python -c`` cannot be).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import Callback
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from abel_lightning.cli import main
from abel_lightning.rewards import register_reward

ROOT = Path(__file__).resolve().parents[1]


@register_reward("test_digits")
def digits(completion: str, gold: str) -> float:
    """An easy reward to raise from a random model: how many digits the completion holds (capped at 4)."""
    return min(sum(ch.isdigit() for ch in completion), 4) / 4


@register_reward("test_rank")
def rank(completion: str, gold: str) -> float:
    """The process's rank, whatever the completion: ranks that disagree, so a statistic of rank 0 alone shows."""
    return float(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0.0


def ppo_args(tiny_model: str, shared_data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(ROOT / "configs/tiny/ppo.yaml"),
        "--model.init_args.model",
        tiny_model,
        "--model.init_args.sampling.max_new_tokens",
        "8",
        "--data.init_args.dataset",
        str(shared_data / "gsm8k/train.jsonl"),
        "--data.init_args.n_samples",
        "16",
        "--data.init_args.batch_size",
        "2",
        "--trainer.callbacks.init_args.dirpath",
        str(tmp_path / "adapter"),
        "--trainer.callbacks.init_args.save_every",
        "2",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]


def metrics(tmp_path: Path) -> list[dict]:
    rows = []
    for path in sorted((tmp_path / "runs").rglob("metrics.csv")):
        rows += [r for r in csv.DictReader(path.open()) if r.get("reward")]
    return rows


class KillAfter(Callback):
    """Dies after ``batches`` training batches, after AdapterCheckpoint's periodic save: a killed job."""

    def __init__(self, batches: int):
        self.batches = batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx + 1 == self.batches:
            raise RuntimeError("killed")


class SeenQuestions(Callback):
    """Appends the question ids of each training batch to ``path``, one line a batch."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with self.path.open("a") as file:
            file.write(" ".join(batch["question_id"]) + "\n")


def test_fit_writes_a_peft_adapter_that_loads_and_resumes_at_the_right_step(tiny_model, shared_data, tmp_path):
    # 8 questions / batch 2 = 4 PPO iterations an epoch; the job dies after iteration 2, just saved.
    seen = tmp_path / "seen.txt"
    common = [
        "--data.init_args.n_samples",
        "8",
        "--model.init_args.advantage",
        "gae",
        "--model.init_args.target_kl",
        "null",
        "--model.init_args.reward",
        "test_digits",
        "--trainer.callbacks+=test_ppo_module.SeenQuestions",
        "--trainer.callbacks.init_args.path",
        str(seen),
    ]
    with pytest.raises(RuntimeError, match="killed"):
        main(
            ppo_args(
                tiny_model,
                shared_data,
                tmp_path,
                *common,
                "--trainer.callbacks+=test_ppo_module.KillAfter",
                "--trainer.callbacks.init_args.batches",
                "2",
            )
        )
    adapter = tmp_path / "adapter"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "value_head.safetensors",
        "last.ckpt",
    ):
        assert (adapter / name).exists(), name

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, adapter)
    trained = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert trained and any(v.abs().sum() > 0 for v in trained.values()), "LoRA B weights never moved from zero"

    main(ppo_args(tiny_model, shared_data, tmp_path, *common, "--ckpt_path", str(adapter / "last.ckpt")))
    # The resumed run does the epoch's last two iterations only.
    resumed = list(csv.DictReader((tmp_path / "runs/ppo/version_1/metrics.csv").open()))
    assert [int(r["step"]) for r in resumed] == [2, 3]
    # The resumed run takes the epoch's last two batches: every question once, none twice.
    batches = seen.read_text().split("\n")[:-1]
    ids = " ".join(batches).split()
    assert len(batches) == 4 and len(ids) == 8 == len(set(ids))


def test_tiny_target_kl_stops_after_the_first_minibatch(tiny_model, shared_data, tmp_path):
    main(
        ppo_args(
            tiny_model,
            shared_data,
            tmp_path,
            "--model.init_args.target_kl",
            "1e-12",
            "--model.init_args.reward",
            "test_digits",
            "--model.init_args.minibatch_size",
            "2",
            "--model.init_args.ppo_epochs",
            "4",
            "--model.init_args.learning_rate",
            "0.01",
            "--trainer.limit_train_batches",
            "2",
        )
    )
    rows = metrics(tmp_path)
    # Without the stop: 4 epochs x (8 rows / 2) = 16 steps an iteration.
    assert [float(r["update_steps"]) for r in rows] == [1.0, 1.0]


def test_sampling_from_the_merged_copy_trains_the_adapter_that_sampling_from_the_policy_does(
    tiny_model, shared_data, tmp_path
):
    for merged in ("true", "false"):
        main(
            ppo_args(
                tiny_model,
                shared_data,
                tmp_path / merged,
                "--model.init_args.sample_merged",
                merged,
                "--model.init_args.reward",
                "test_digits",
                "--model.init_args.learning_rate",
                "0.01",
                "--trainer.limit_train_batches",
                "3",
            )
        )
    fast, plain = (load_file(tmp_path / merged / "adapter/adapter_model.safetensors") for merged in ("true", "false"))
    assert fast.keys() == plain.keys() and any(v.abs().max() > 0 for k, v in fast.items() if "lora_B" in k)
    for key in fast:
        torch.testing.assert_close(fast[key], plain[key], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_two_ranks_log_statistics_over_both_not_rank_zeros(tiny_model, shared_data, tmp_path):
    # Rank 0 scores every completion 0 and rank 1 scores it 1: the logged mean reward and accuracy are 0.5.
    args = ppo_args(
        tiny_model,
        shared_data,
        tmp_path,
        "--model.init_args.reward",
        "test_rank",
        "--data.init_args.n_samples",
        "8",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    )
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    # A stall guard for a deadlocked process group, not a time limit (a loaded machine takes minutes).
    run = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=3600, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "MEMBER: 2/2" in run.stderr
    rows = metrics(tmp_path)
    assert len(rows) == 2  # 8 questions / (2 ranks x 2)
    assert [(float(r["reward"]), float(r["accuracy"])) for r in rows] == [(0.5, 0.5)] * 2


if __name__ == "__main__":
    main()
