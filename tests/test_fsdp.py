"""FSDP: its units for a LoRA model, and training under it, which must give the adapter DDP gives."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_dpo_module import make_adapter, write_pairs

from abel_lightning.data.gsm8k import load_questions
from abel_lightning.data.toy import write_toy_dataset
from abel_lightning.jsonl import read_jsonl
from abel_lightning.models.fsdp import wrap_decoder_layers_and_lora
from abel_lightning.models.loading import LoraSettings, attach_lora, load_base
from abel_lightning.models.tiny import build_tokenizer, random_model
from abel_lightning.schemas import ROLLOUT

REPO = Path(__file__).resolve().parents[1]


def test_each_unit_is_a_decoder_layer_or_a_trainable_lora_matrix():
    tokenizer = build_tokenizer(["Tom has 3 apples. #### 3"] * 4, 300)
    model = attach_lora(
        random_model("tiny-llama", tokenizer).to(torch.bfloat16), LoraSettings(r=4, alpha=8), None, trainable=True
    )
    wrapped = [name for name, module in model.named_modules() if wrap_decoder_layers_and_lora(module, False, 0)]
    layers = [n for n in wrapped if n.endswith(tuple(f"layers.{i}" for i in range(10)))]
    lora = [n for n in wrapped if ".lora_A." in n or ".lora_B." in n]
    assert len(layers) == model.config.num_hidden_layers and len(lora) + len(layers) == len(wrapped)
    # LoRA weights stay float32 beside the bf16 base, each in a unit of its own.
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert wrap_decoder_layers_and_lora(model, True, 0)  # FSDP asks before recursing: always go in


# -- FSDP against DDP, two CPU processes each, through the CLI ----------------------------------------------------

FSDP_ON_CPU = Path(__file__).with_name("cpu_fsdp.py")


def abel_lightning(*args: str) -> subprocess.CompletedProcess:
    """The CLI in processes of its own, which can import the CPU FSDP shim. The timeout is a stall guard for a
    deadlocked process group, not a time limit (a loaded 2-core machine takes minutes)."""
    env = os.environ | {"PYTHONPATH": str(FSDP_ON_CPU.parent), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "abel_lightning.cli", *args, "--trainer.enable_progress_bar", "false"]
    return subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)


def run_cli(config: str, strategy: str, out: Path, *args: str) -> Path:
    """``abel-lightning fit`` on 2 gloo processes; returns the adapter folder it saved."""
    run = abel_lightning(
        "fit",
        "--config",
        config,
        "--config",
        strategy,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.callbacks.init_args.dirpath",
        str(out / "adapter"),
        "--trainer.logger.init_args.save_dir",
        str(out),
        *args,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "MEMBER: 2/2" in run.stderr
    return out / "adapter"


@pytest.fixture(scope="module")
def cpu_fsdp_strategy(tmp_path_factory) -> str:
    """configs/strategy/fsdp.yaml with its strategy class swapped for the CPU shim, nothing else changed."""
    text = (REPO / "configs/strategy/fsdp.yaml").read_text()
    assert "lightning.pytorch.strategies.FSDPStrategy" in text
    path = tmp_path_factory.mktemp("strategy") / "fsdp_cpu.yaml"
    path.write_text(text.replace("lightning.pytorch.strategies.FSDPStrategy", "cpu_fsdp.CPUFSDPStrategy"))
    return str(path)


def phase_args(phase: str, tiny_model: str, tmp_path: Path) -> tuple[str, str, list[str]]:
    """The phase's tiny config, its base model, and the arguments that make it a short run."""
    if phase == "ppo":  # the shipped toy base, which gets some toy problems right; GAE trains the value head too
        toy = write_toy_dataset(tmp_path / "toy", n_train=32, n_test=1)["train"]
        return (
            str(REPO / "configs/tiny/ppo.yaml"),
            "builtin:toy",
            [
                "--model.init_args.advantage",
                "gae",
                "--model.init_args.target_kl",
                "null",
                "--model.init_args.minibatch_size",
                "8",
                "--data.init_args.dataset",
                str(toy.parent),
                "--data.init_args.n_samples",
                "8",
                "--data.init_args.batch_size",
                "4",
                "--trainer.max_steps",
                "8",
            ],
        )
    # From a starting adapter with a frozen copy as the reference: two adapters in the sharded model.
    start = make_adapter(tiny_model, tmp_path / "start")
    return (
        str(REPO / "configs/tiny/dpo.yaml"),
        tiny_model,
        [
            "--model.init_args.model",
            tiny_model,
            "--model.init_args.adapter",
            str(start),
            "--model.init_args.reference",
            "adapter",
            "--model.init_args.learning_rate",
            "1e-2",
            "--data.init_args.pairs",
            str(write_pairs(tmp_path / "pairs.jsonl", 16)),
            "--data.init_args.rollouts",
            "null",
            "--data.init_args.val_fraction",
            "0",
            "--trainer.max_steps",
            "2",
        ],
    )


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["ppo", "dpo"])
def test_fsdp_trains_the_adapter_ddp_trains_and_saves_it_for_one_device(phase, tiny_model, cpu_fsdp_strategy, tmp_path):
    config, model, args = phase_args(phase, tiny_model, tmp_path)
    ddp = run_cli(config, str(REPO / "configs/strategy/ddp.yaml"), tmp_path / "ddp", *args)
    fsdp = run_cli(config, cpu_fsdp_strategy, tmp_path / "fsdp", *args)

    sharded, replicated = (load_file(folder / "adapter_model.safetensors") for folder in (fsdp, ddp))
    assert sorted(sharded) == sorted(replicated) and any("lora_B" in k for k in sharded)
    assert any(sharded[k].abs().max() > 0 for k in sharded if "lora_B" in k)  # it trained
    for key in sharded:
        torch.testing.assert_close(sharded[key], replicated[key], rtol=1e-4, atol=1e-6)
    if phase == "ppo":
        torch.testing.assert_close(
            load_file(fsdp / "value_head.safetensors"), load_file(ddp / "value_head.safetensors")
        )
    # The adapter saved under FSDP loads on the plain base, on one device, and changes its output.
    base = load_base(model, "float32")
    ids = torch.tensor([[1, 5, 9, 13]])
    before = base(ids).logits
    assert not torch.allclose(PeftModel.from_pretrained(base, str(fsdp))(ids).logits, before)


def test_fsdp_training_on_one_device_refuses_to_start_and_says_what_to_use(tiny_model, cpu_fsdp_strategy, tmp_path):
    run = abel_lightning(
        "fit",
        "--config",
        str(REPO / "configs/tiny/dpo.yaml"),
        "--config",
        cpu_fsdp_strategy,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--model.init_args.model",
        tiny_model,
        "--model.init_args.adapter",
        "null",
        "--data.init_args.pairs",
        str(write_pairs(tmp_path / "p.jsonl")),
        "--data.init_args.rollouts",
        "null",
        "--trainer.callbacks.init_args.dirpath",
        str(tmp_path / "adapter"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
    )
    assert run.returncode != 0
    assert "needs 2 or more devices" in run.stderr and "configs/strategy/ddp.yaml" in run.stderr
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow
def test_evaluation_under_fsdp_scores_each_question_once_with_one_process_accuracy(cpu_fsdp_strategy, tmp_path):
    # 23 questions in batches of 5: rank 1's 11 questions and the filler take 3 batches, as rank 0's 12 do.
    toy = write_toy_dataset(tmp_path / "toy", n_train=1, n_test=23)["test"].parent
    accuracy, ids = {}, {}
    for name, args in {
        "one": ["--trainer.devices", "1"],
        "fsdp": ["--config", cpu_fsdp_strategy, "--trainer.accelerator", "cpu", "--trainer.devices", "2"],
    }.items():
        out = tmp_path / name
        run = abel_lightning(
            "test",
            "--config",
            str(REPO / "configs/tiny/eval.yaml"),
            *args,
            "--data.init_args.dataset",
            str(toy),
            "--data.init_args.batch_size",
            "5",
            "--trainer.callbacks.init_args.output_dir",
            str(out),
        )
        assert run.returncode == 0, run.stderr[-4000:]
        # The accuracy the callback reduced over ranks and printed, and the one the written records give.
        printed = re.search(r"platinum_accuracy \S+ \((\d+)/(\d+)\)", run.stdout)
        records = read_jsonl(out / "base_platinum_eval.jsonl")
        accuracy[name] = (int(printed[1]), int(printed[2]), sum(r["correct"] for r in records))
        ids[name] = sorted(r["question_id"] for r in records)
    assert ids["fsdp"] == ids["one"] and len(ids["one"]) == 23 == len(set(ids["one"]))
    correct, answered, in_records = accuracy["one"]
    assert accuracy["fsdp"] == accuracy["one"] and answered == 23 and correct == in_records > 0


@pytest.mark.slow
def test_rollouts_under_fsdp_give_each_question_once_in_source_order(cpu_fsdp_strategy, tmp_path):
    # 7 questions in batches of 3: rank 0 answers 4 in 2 batches, rank 1 answers 3 and must still decode a second
    # batch (the filler question), or rank 0's second batch waits for it forever.
    toy = write_toy_dataset(tmp_path / "toy", n_train=7, n_test=1)["train"].parent
    output = tmp_path / "rollouts.jsonl"
    run = abel_lightning(
        "predict",
        "--config",
        str(REPO / "configs/tiny/rollouts.yaml"),
        "--config",
        cpu_fsdp_strategy,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--model.init_args.adapter",
        "null",
        "--data.init_args.dataset",
        str(toy),
        "--data.init_args.n_samples",
        "null",
        "--data.init_args.batch_size",
        "3",
        "--trainer.callbacks.init_args.output",
        str(output),
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "MEMBER: 2/2" in run.stderr
    records = read_jsonl(output, ROLLOUT)
    assert [r["question_id"] for r in records] == [q["question_id"] for q in load_questions(str(toy), "train")]
    assert all(len(r["trajectories"]) == 8 for r in records) and not list(tmp_path.glob("*.part*"))


@pytest.mark.slow
def test_dpo_under_fsdp_resumes_from_its_checkpoint_as_if_never_stopped(tiny_model, cpu_fsdp_strategy, tmp_path):
    """One epoch, then a second from ``last.ckpt`` (sharded optimizer state, loop state), against two in one go."""
    config = str(REPO / "configs/tiny/dpo.yaml")
    args = [
        "--model.init_args.model",
        tiny_model,
        "--model.init_args.adapter",
        "null",
        "--model.init_args.learning_rate",
        "1e-2",
        "--data.init_args.pairs",
        str(write_pairs(tmp_path / "pairs.jsonl", 24)),
        "--data.init_args.rollouts",
        "null",
        "--data.init_args.val_fraction",
        "0",
    ]
    straight = run_cli(config, cpu_fsdp_strategy, tmp_path / "straight", *args, "--trainer.max_epochs", "2")
    run_cli(config, cpu_fsdp_strategy, tmp_path / "resumed", *args, "--trainer.max_epochs", "1")
    resumed = run_cli(
        config,
        cpu_fsdp_strategy,
        tmp_path / "resumed",
        *args,
        "--trainer.max_epochs",
        "2",
        "--ckpt_path",
        str(tmp_path / "resumed/adapter/last.ckpt"),
    )

    losses = lambda folder: [row["train/global_batch_loss"] for row in logged(folder)]  # noqa: E731
    assert losses(tmp_path / "resumed/dpo/version_1") == losses(tmp_path / "straight/dpo/version_0")[3:]
    a, b = (load_file(folder / "adapter_model.safetensors") for folder in (straight, resumed))
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def logged(folder: Path) -> list[dict]:
    with open(folder / "metrics.csv") as file:
        return [row for row in csv.DictReader(file) if row.get("train/global_batch_loss")]
