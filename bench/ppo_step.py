"""Phase 1 PPO iteration cost on one GPU: seconds for generation, scoring (old/reference log-probs and values) and
the clipped updates, and peak memory, for a bf16 or a 4-bit (QLoRA) base.

    python bench/ppo_step.py --model mistral-7b-random [--quantization 4bit] --iterations 3 [--no-sample-merged]
    python bench/ppo_step.py --questions 64 --minibatch-size 16   # configs/ppo_fast.yaml's split

Runs PPOModule through Lightning's Trainer exactly as `abel-lightning fit` does; the first iteration is a warm-up and
is left out of the means.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/x.py` puts bench/ on sys.path, not the checkout: make `bench` importable from the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import csv  # noqa: E402
import tempfile  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from abel_lightning.data.gsm8k import GSM8KDataModule  # noqa: E402
from abel_lightning.data.toy import write_toy_dataset  # noqa: E402
from abel_lightning.jsonl import read_jsonl  # noqa: E402
from abel_lightning.models.generation import SamplingSettings  # noqa: E402
from abel_lightning.modules.ppo import PPOModule  # noqa: E402
from abel_lightning.prompts import format_prompt  # noqa: E402
from bench.models import gib, materialize, matmul_tflops, training_flop  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mistral-7b-random")
    parser.add_argument("--quantization", default=None, choices=[None, "4bit", "8bit"])
    parser.add_argument("--questions", type=int, default=4, help="questions per PPO iteration (data.batch_size)")
    parser.add_argument(
        "--minibatch-size", type=int, default=None, help="rollout rows per optimizer step; default: --questions"
    )
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--engine", default="auto", choices=["auto", "static", "hf"], help="sampling.engine")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--sample-merged",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rollouts from the merged copy; --no-sample-merged samples from the policy (the baseline)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp())
    write_toy_dataset(work / "toy", n_train=max(64, args.questions * args.iterations), n_test=8)
    module = PPOModule(
        model=materialize(args.model),
        quantization=args.quantization,
        sampling=SamplingSettings(temperature=0.7, max_new_tokens=args.new_tokens, engine=args.engine),
        minibatch_size=args.minibatch_size or args.questions,
        target_kl=None,
        gradient_checkpointing=args.gradient_checkpointing,
        sample_merged=args.sample_merged,
    )
    data = GSM8KDataModule(dataset=str(work / "toy"), split="train", batch_size=args.questions)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=1,
        limit_train_batches=args.iterations,
        logger=CSVLogger(work, name="ppo"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, data)
    rows = [r for r in csv.DictReader(next(work.rglob("metrics.csv")).open()) if r.get("reward")][1:]
    mean = lambda key: sum(float(r[key]) for r in rows) / len(rows)  # noqa: E731
    label = args.quantization or "bf16"
    # The update's rate and MFU as issue 7 counts it (6 x parameters FLOP per token): every epoch runs each row's
    # prompt and response once more.
    prompts = [format_prompt(q["question"]) for q in read_jsonl(work / "toy" / "train.jsonl")]
    prompt_tokens = sum(len(ids) for ids in module.tokenizer(prompts)["input_ids"]) / len(prompts)
    tokens = args.questions * (prompt_tokens + mean("response_length")) * module.hparams.ppo_epochs
    update_rate = tokens / mean("update_seconds")
    mfu = (
        f"{training_flop(module.policy, update_rate) / 1e12 / matmul_tflops():.0%}"
        if args.quantization is None
        else "n/a"
    )
    checkpointing = "on" if args.gradient_checkpointing else "off"
    sampled_from = "merged copy" if args.sample_merged and args.quantization is None else "policy"
    iteration = sum(mean(key) for key in ("generation_seconds", "evaluate_seconds", "update_seconds"))
    print(
        "\n| base | questions / minibatch rows | engine | sampled from | gradient checkpointing | generation s "
        "| tokens/s | scoring s "
        "| update s (4 epochs) | update tokens/s | update MFU | iteration s | peak GiB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    print(
        f"| {label} | {args.questions} / {module.hparams.minibatch_size} | {args.engine} | {sampled_from} "
        f"| {checkpointing} | {mean('generation_seconds'):.2f} | "
        f"{mean('generation_tokens_per_s'):,.0f} | {mean('evaluate_seconds'):.2f} | {mean('update_seconds'):.2f} | "
        f"{update_rate:,.0f} | {mfu} | {iteration:.2f} | {gib(torch.cuda.max_memory_allocated()):.1f} |"
    )
    print(
        f"{args.questions} questions x 1 sample x {args.new_tokens} new tokens, prompts of {prompt_tokens:.0f} tokens, "
        f"means over {len(rows)} iterations after a warm-up; {torch.cuda.get_device_name()}"
    )


if __name__ == "__main__":
    main()
