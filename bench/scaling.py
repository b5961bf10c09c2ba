"""One GPU against N through the real CLI and the shipped configs: only ``--config configs/strategy/<s>.yaml`` and
``--trainer.devices`` change between the runs.

    python bench/scaling.py --strategy ddp --devices 2 --model mistral-7b-random
    python bench/scaling.py --strategy fsdp --devices 2 --model mistral-7b-random --phases dpo ppo

For each phase it runs the same job on 1 GPU and on ``--devices`` GPUs and prints a table of throughput and the ratio:

- ``ppo``: ``configs/ppo.yaml``, 4 questions per device per iteration; questions/s of iterations after the first,
  from the per-iteration generation, scoring and update seconds the module logs (reduced across ranks).
- ``rollouts``: ``configs/rollouts.yaml``; generated tokens/s over all ranks, as the collector reports it.
- ``dpo``: ``configs/dpo.yaml`` with the same global batch on both (``--global-batch`` pairs: per-device batch 2,
  accumulation adjusted), the same pairs and seed, ``--dpo-steps`` optimizer steps: the loss curves side by side,
  their largest difference, and tokens/s.
- ``eval``: greedy ``configs/eval.yaml`` on 1 and N GPUs: each question exactly once, the same accuracy.

Ends by loading the last N-GPU DPO adapter with ``PeftModel.from_pretrained`` on one device.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/x.py` puts bench/ on sys.path, not the checkout: make `bench` importable from the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from abel_lightning.data.toy import write_toy_dataset  # noqa: E402
from abel_lightning.jsonl import read_jsonl, write_jsonl_atomic  # noqa: E402
from abel_lightning.models.loading import load_tokenizer  # noqa: E402
from bench.dpo_step import synthetic_pairs  # noqa: E402
from bench.models import adapter_report, materialize  # noqa: E402

CLI = [sys.executable, "-m", "abel_lightning.cli"]
QUIET = ["--trainer.enable_progress_bar", "false"]


def cli(*args: str) -> tuple[str, float]:
    """Run ``abel-lightning`` and return its output and wall seconds; stop the benchmark on a failure."""
    started = time.perf_counter()
    done = subprocess.run([*CLI, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-8000:], sep="\n")
        raise SystemExit(f"failed ({done.returncode}): abel-lightning {' '.join(args)}")
    return done.stdout + done.stderr, seconds


def on(devices: int, args) -> list[str]:
    """The only thing that changes between a 1-GPU and an N-GPU run (and, for a dry run, the CPU overrides)."""
    cpu = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.init_args.dtype", "float32"]
    strategy = [] if devices == 1 else ["--config", f"configs/strategy/{args.strategy}.yaml"]
    return [*strategy, "--trainer.devices", str(devices), *(cpu if args.accelerator == "cpu" else [])]


def metrics(folder: Path) -> list[dict]:
    return list(csv.DictReader(next(folder.rglob("metrics.csv")).open()))


def ppo(args, work: Path, devices: int) -> tuple[float, dict]:
    per_device = 4
    out = work / f"ppo{devices}"
    _, seconds = cli(
        "fit",
        "--config",
        "configs/ppo.yaml",
        *on(devices, args),
        *QUIET,
        "--model.init_args.model",
        args.model_path,
        "--data.init_args.dataset",
        str(work / "toy"),
        "--data.init_args.batch_size",
        str(per_device),
        "--data.init_args.n_samples",
        str(per_device * devices * args.ppo_iterations),
        "--model.init_args.sampling.max_new_tokens",
        str(args.new_tokens),
        "--model.init_args.ppo_epochs",
        "2",
        "--trainer.callbacks.init_args.dirpath",
        str(out / "adapter"),
        "--trainer.logger.init_args.save_dir",
        str(out),
    )
    rows = [r for r in metrics(out) if r.get("generation_seconds")][1:]
    iteration = [sum(float(r[k]) for k in ("generation_seconds", "evaluate_seconds", "update_seconds")) for r in rows]
    mean = sum(iteration) / len(iteration)
    last = rows[-1]
    return per_device * devices / mean, {
        "s/iteration": f"{mean:.1f}",
        "reward": last["reward"],
        "kl": f"{float(last['kl']):.4f}",
        "wall s": f"{seconds:.0f}",
    }


def rollouts(args, work: Path, devices: int) -> tuple[float, dict]:
    out = work / f"rollouts{devices}.jsonl"
    text, seconds = cli(
        "predict",
        "--config",
        "configs/rollouts.yaml",
        *on(devices, args),
        *QUIET,
        "--model.init_args.model",
        args.model_path,
        "--model.init_args.adapter",
        "null",
        "--data.init_args.dataset",
        str(work / "toy"),
        "--data.init_args.n_samples",
        str(args.questions),
        "--data.init_args.batch_size",
        str(args.rollout_batch),
        "--model.init_args.sampling.max_new_tokens",
        str(args.new_tokens),
        "--trainer.callbacks.init_args.output",
        str(out),
    )
    rate = float(re.search(r"tokens/s \(this run\)\D*([\d.]+)", text).group(1))
    ids = [r["question_id"] for r in read_jsonl(out)]
    assert len(ids) == len(set(ids)) == args.questions, f"{out}: {len(ids)} records, {len(set(ids))} distinct"
    return rate, {"records": str(len(ids)), "wall s": f"{seconds:.0f}"}


def dpo(args, work: Path, devices: int) -> tuple[float, dict]:
    out = work / f"dpo{devices}"
    accumulate = args.global_batch // (2 * devices)
    text, seconds = cli(
        "fit",
        "--config",
        "configs/dpo.yaml",
        *on(devices, args),
        *QUIET,
        "--model.init_args.model",
        args.model_path,
        "--model.init_args.adapter",
        "null",
        "--model.init_args.learning_rate",
        str(args.dpo_lr),
        "--data.init_args.pairs",
        str(work / "pairs.jsonl"),
        "--data.init_args.rollouts",
        "null",
        "--data.init_args.val_fraction",
        "0",
        "--data.init_args.batch_size",
        "2",
        "--trainer.accumulate_grad_batches",
        str(accumulate),
        "--trainer.max_steps",
        str(args.dpo_steps),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.callbacks.init_args.dirpath",
        str(out / "adapter"),
        "--trainer.logger.init_args.save_dir",
        str(out),
    )
    rows = metrics(out)
    curve = [float(row["train/global_batch_loss"]) for row in rows if row.get("train/global_batch_loss")]
    rates = [float(row["train/tokens_per_s"]) for row in rows if row.get("train/tokens_per_s")]
    warm = rates[len(rates) // 4 :]  # leave out the first quarter of the batches (warm-up)
    global_batch = re.search(r"DPO global batch: (\d+ pairs = .*? devices)", text).group(1)
    return devices * sum(warm) / len(warm), {
        "global batch": global_batch,
        "curve": curve,
        "wall s": f"{seconds:.0f}",
        "adapter": str(out / "adapter"),
    }


def evaluate(args, work: Path, devices: int) -> tuple[float, dict]:
    out = work / f"eval{devices}"
    text, seconds = cli(
        "test",
        "--config",
        "configs/eval.yaml",
        *on(devices, args),
        *QUIET,
        "--model.init_args.model",
        args.model_path,
        "--data.init_args.dataset",
        str(work / "toy"),
        "--data.init_args.split",
        "test",
        "--model.init_args.sampling.max_new_tokens",
        str(args.new_tokens),
        "--trainer.callbacks.init_args.output_dir",
        str(out),
        "--trainer.logger",
        "false",
    )
    records = read_jsonl(next(out.glob("*_platinum_eval.jsonl")))
    ids = [r["question_id"] for r in records]
    assert len(ids) == len(set(ids)), f"{out}: a question was answered twice"
    accuracy = sum(r["correct"] for r in records) / len(records)
    rate = float(re.search(r"([\d.]+) tokens/s", text).group(1))
    return rate, {"records": str(len(ids)), "accuracy": f"{accuracy:.4f}", "wall s": f"{seconds:.0f}"}


PHASES = {
    "ppo": (ppo, "questions/s"),
    "rollouts": (rollouts, "tokens/s"),
    "dpo": (dpo, "tokens/s"),
    "eval": (evaluate, "tokens/s"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mistral-7b-random")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--rollout-batch", type=int, default=8, help="questions per device per step (x 8 samples)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ppo-iterations", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--dpo-steps", type=int, default=20)
    parser.add_argument("--dpo-lr", type=float, default=1e-4)
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"], help="cpu: a gloo dry run, tiny models")
    parser.add_argument("--work", default="/tmp/abel-scaling")
    args = parser.parse_args()

    work = Path(args.work) / f"{args.model.replace(':', '-')}-{args.strategy}-{args.devices}"
    # A fresh folder: the phases resume from what they find (rollouts, evaluation) and metrics are read back from it.
    shutil.rmtree(work, ignore_errors=True)
    args.model_path = materialize(args.model)
    write_toy_dataset(work / "toy", n_train=max(512, args.questions), n_test=args.questions)
    pairs = synthetic_pairs(load_tokenizer(args.model_path), args.global_batch * args.dpo_steps, 160, 256)
    write_jsonl_atomic(work / "pairs.jsonl", pairs)

    unit = "GPU" if args.accelerator == "gpu" else "CPU process"
    print(f"\n{args.model} ({args.model_path}), strategy {args.strategy}, 1 vs {args.devices} x {unit}")
    print(
        f"\n| phase | rate | 1 {unit} | {args.devices} x {unit} | ratio | 1 {unit} details "
        f"| {args.devices} x {unit} details |"
    )
    print("|---|---|---|---|---|---|---|")
    results = {}
    for phase in args.phases:
        run, rate = PHASES[phase]
        one, one_details = run(args, work, 1)
        many, many_details = run(args, work, args.devices)
        results[phase] = (one_details, many_details)
        shown = lambda d: ", ".join(f"{k} {v}" for k, v in d.items() if k not in ("curve", "adapter"))  # noqa: E731
        print(
            f"| {phase} | {rate} | {one:,.1f} | {many:,.1f} | {many / one:.2f} "
            f"| {shown(one_details)} | {shown(many_details)} |",
            flush=True,
        )

    if "dpo" in results:
        (one, many) = results["dpo"]
        steps = min(len(one["curve"]), len(many["curve"]))
        gap = max(abs(a - b) for a, b in zip(one["curve"], many["curve"]))
        print(
            f"\nDPO loss, global batch {args.global_batch}, lr {args.dpo_lr}: "
            f"largest |1 - {args.devices} x {unit}| over "
            f"{steps} steps = {gap:.2e}"
        )
        print(f"| step | 1 {unit} | {args.devices} x {unit} |\n|---|---|---|")
        for step, (a, b) in enumerate(zip(one["curve"], many["curve"])):
            print(f"| {step} | {a:.5f} | {b:.5f} |")
        device = "cuda" if args.accelerator == "gpu" else "cpu"
        print(f"from {args.devices} ranks: {adapter_report(args.model_path, many['adapter'], device)}")
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
