"""Phase 4 DPO step cost on one GPU: tokens/s and peak memory for a bf16 or a 4-bit (QLoRA) base, at the seed's
per-device batch (2 pairs, chosen and rejected in one concatenated forward pass).

    python bench/dpo_step.py --model mistral-7b-random [--quantization 4bit] --steps 6

Runs DPOModule through Lightning's Trainer as `abel-lightning fit --config configs/dpo.yaml` does, with synthetic
pairs of ``--prompt-tokens`` + ``--response-tokens``. The reference log-probs are cached in a pass before training
(timed separately); the first two steps are warm-up and left out of the mean.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/x.py` puts bench/ on sys.path, not the checkout: make `bench` importable from the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from abel_lightning.data.preferences import PreferenceDataModule  # noqa: E402
from abel_lightning.data.toy import make_problems  # noqa: E402
from abel_lightning.jsonl import write_jsonl_atomic  # noqa: E402
from abel_lightning.models import sequences  # noqa: E402
from abel_lightning.models.loading import load_tokenizer  # noqa: E402
from abel_lightning.prompts import format_prompt  # noqa: E402
from bench.models import gib, materialize, matmul_tflops, training_flop  # noqa: E402


def synthetic_pairs(tokenizer, n: int, prompt_tokens: int, response_tokens: int, vary: bool = False) -> list[dict]:
    """``n`` pairs of ``prompt_tokens`` + ``response_tokens``; with ``vary``, each prompt and response has a length
    drawn uniformly from half to all of that, as real pairs of unequal solutions have."""
    problems = make_problems(n * 4, seed=2)
    text = " ".join(p["answer"] for p in problems)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    length = lambda full: rng.randint(full // 2, full) if vary else full  # noqa: E731
    cut = lambda start, full: tokenizer.decode(ids[start : start + length(full)])  # noqa: E731
    return [
        {
            "question_id": f"bench/{i}",
            "prompt": format_prompt(cut(i * 11, prompt_tokens)),
            "chosen": cut(i * 13, response_tokens),
            "rejected": cut(i * 17 + 5, response_tokens),
            "kind": "correctness",
            "reward_gap": 1.0,
        }
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mistral-7b-random")
    parser.add_argument("--quantization", default=None, choices=[None, "4bit", "8bit"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=160)
    parser.add_argument("--response-tokens", type=int, default=256)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--peft-input-casts",
        action="store_true",
        help="the baseline: PEFT casts each LoRA input to float32 under autocast (as before 2026-11-25)",
    )
    parser.add_argument("--vary-lengths", action="store_true", help="prompts and responses of 50-100%% of the lengths")
    parser.add_argument("--padded", action="store_true", help="the baseline: the padded forward (before 2026-11-25)")
    args = parser.parse_args()
    # The baselines: the code paths as they were, restored by switching this session's changes off.
    if args.padded:
        sequences.packable = lambda config: False
    if args.peft_input_casts:
        sequences.disable_input_dtype_casting = lambda model, active: contextlib.nullcontext()

    from abel_lightning.modules.dpo import DPOModule

    work = Path(tempfile.mkdtemp())
    path = materialize(args.model)
    pairs = work / "pairs.jsonl"
    n = args.steps * args.batch_size
    write_jsonl_atomic(
        pairs, synthetic_pairs(load_tokenizer(path), n, args.prompt_tokens, args.response_tokens, args.vary_lengths)
    )
    module = DPOModule(
        model=path, adapter=None, quantization=args.quantization, gradient_checkpointing=args.gradient_checkpointing
    )
    data = PreferenceDataModule(pairs=str(pairs), rollouts=None, batch_size=args.batch_size, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=1,
        limit_val_batches=0,
        logger=CSVLogger(work, name="dpo"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.fit(module, data)
    total = time.perf_counter() - started
    rows = [r for r in csv.DictReader(next(work.rglob("metrics.csv")).open()) if r.get("train/tokens_per_s")][2:]
    tokens_per_s = sum(float(r["train/tokens_per_s"]) for r in rows) / len(rows)
    tokens_per_step = 2 * args.batch_size * (args.prompt_tokens + args.response_tokens)
    label = args.quantization or "bf16"
    # MFU as the issue counts it: 6 x parameters FLOP per token, over the bf16 matrix-product rate measured here.
    peak = matmul_tflops()
    # (A 4-bit base packs two weights per element, so its count, and MFU, would be wrong: not shown.)
    mfu = f"{training_flop(module.policy, tokens_per_s) / 1e12 / peak:.0%}" if args.quantization is None else "n/a"
    checkpointing = "on" if args.gradient_checkpointing else "off"
    casts = "PEFT's" if args.peft_input_casts else "autocast's"
    forward = "padded" if args.padded else "packed where it pays"
    lengths = "50-100% of" if args.vary_lengths else "all"
    # tokens/s counts real tokens only, so MFU credits no padding.
    print(
        "\n| base | pairs/step | lengths | forward | gradient checkpointing | LoRA input casts | tokens/s | MFU "
        "| peak GiB |"
        "\n|---|---|---|---|---|---|---|---|---|"
    )
    print(
        f"| {label} | {args.batch_size} | {lengths} | {forward} | {checkpointing} | {casts} | {tokens_per_s:,.0f} "
        f"| {mfu} | {gib(torch.cuda.max_memory_allocated()):.1f} |"
    )
    print(
        f"{args.batch_size} pairs/step, up to {tokens_per_step} tokens/step (chosen + rejected, prompt included), "
        f"bf16 matmul peak measured {peak:.0f} TFLOP/s; {len(rows)} steps after warm-up; "
        f"fit incl. reference pass {total:.0f} s; "
        f"{torch.cuda.get_device_name()}"
    )


if __name__ == "__main__":
    main()
