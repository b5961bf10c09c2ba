"""PPO variants on the toy testbed, several seeds: held-out greedy accuracy, gain over the base, PPO wall time.

    python bench/toy_seeds.py                                  # default, kl-reward, fast; seeds 0 1 2
    python bench/toy_seeds.py --variants default fast --seeds 0 --out runs/toyseeds

Every run goes through the real CLI with ``configs/tiny/ppo.yaml`` and ``configs/tiny/eval.yaml`` (see docs/TOY.md);
only the flags below differ between the variants:

- ``default``: the config as shipped, GRPO's KL in the loss (k3, coefficient 0.01).
- ``kl-reward``: ``--model.init_args.kl_in reward``: k1 folded into the reward before GRPO's standardisation.
- ``fast``: 32 questions an iteration (128 rows decoded per call) with the same 16-row update minibatch: 4x fewer,
  larger decode calls. The train loader drops the last partial batch, so that is 12 iterations over 384 of the 400
  questions and 192 optimizer steps, against the default's 50 iterations and 200 steps.

The data is written once (2,000 train, 200 held out, seed 0: the pipeline's held-out set) and its order stays
``data.init_args.seed`` 0; ``--seed_everything`` varies sampling and initialisation. A fit whose adapter and wall
time are already under ``--out`` is not rerun, and the eval files resume, so the script can be run variant by variant
and prints the whole table each time.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/x.py` puts bench/ on sys.path, not the checkout: make `bench` importable from the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from abel_lightning.data.toy import write_toy_dataset  # noqa: E402
from abel_lightning.jsonl import read_jsonl  # noqa: E402

VARIANTS = {
    "default": [],
    "kl-reward": ["--model.init_args.kl_in", "reward"],
    "fast": ["--data.init_args.batch_size", "32"],
}
N_TEST = 200


def cli(*args: str) -> None:
    """Run ``abel-lightning <args>`` in this interpreter; a failed run stops the benchmark."""
    subprocess.run([sys.executable, "-m", "abel_lightning.cli", *args], check=True)


def use_threads(threads: int) -> None:
    """Give every child run ``threads`` OpenMP threads: on a shared machine torch's default of one a core makes
    each parallel region wait for threads another process holds (a toy fit took 18 min instead of 3 on two cores)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)


def fit(variant: str, seed: int, out: Path, extra: list[str]) -> float:
    """Train one PPO adapter into ``<out>/<variant>-<seed>`` and return the fit's wall seconds."""
    start = time.perf_counter()
    cli(
        "fit",
        "--config",
        "configs/tiny/ppo.yaml",
        "--seed_everything",
        str(seed),
        *VARIANTS[variant],
        *extra,
        "--data.init_args.dataset",
        str(out / "toy"),
        "--trainer.callbacks.init_args.dirpath",
        str(out / f"{variant}-{seed}"),
        "--trainer.logger.init_args.save_dir",
        str(out / "logs"),
        "--trainer.enable_progress_bar",
        "false",
    )
    return time.perf_counter() - start


def evaluate(name: str, adapter: Path | None, out: Path) -> float:
    """Greedy accuracy of the base (``adapter`` None) or an adapter on the 200 held-out problems."""
    cli(
        "test",
        "--config",
        "configs/tiny/eval.yaml",
        "--data.init_args.dataset",
        str(out / "toy"),
        "--model.init_args.adapter",
        "null" if adapter is None else str(adapter),
        "--trainer.callbacks.init_args.output_dir",
        str(out / "eval"),
        "--trainer.callbacks.init_args.name",
        name,
        "--trainer.enable_progress_bar",
        "false",
    )
    records = read_jsonl(out / "eval" / f"{name}_platinum_eval.jsonl")
    if len(records) != N_TEST:
        raise RuntimeError(f"{out / 'eval' / name}_platinum_eval.jsonl: {len(records)} records, expected {N_TEST}")
    return sum(bool(r["correct"]) for r in records) / len(records)


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60)} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/toyseeds"))
    parser.add_argument("--n-samples", type=int, default=None, help="training questions (config: 400); for a check")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per run (the CI toy test uses 1)")
    args = parser.parse_args()
    use_threads(args.threads)

    out: Path = args.out
    if not (out / "toy" / "test.jsonl").exists():
        write_toy_dataset(out / "toy", 2000, N_TEST, 0)
    extra = [] if args.n_samples is None else ["--data.init_args.n_samples", str(args.n_samples)]
    times_path = out / "wall_times.json"
    wall = json.loads(times_path.read_text()) if times_path.exists() else {}

    base = evaluate("base", None, out)
    rows = []
    for variant in args.variants:
        for seed in args.seeds:
            name = f"{variant}-{seed}"
            adapter = out / name
            if name not in wall or not (adapter / "adapter_config.json").exists():
                wall[name] = fit(variant, seed, out, extra)
                times_path.write_text(json.dumps(wall, indent=1))
            rows.append((variant, seed, evaluate(name, adapter, out), wall[name]))

    print(f"\nbase (greedy): {base:.1%}\n")
    print("| variant | seed | held-out accuracy | gain over base | PPO wall time |")
    print("|---|---|---|---|---|")
    for variant, seed, accuracy, seconds in rows:
        print(f"| {variant} | {seed} | {accuracy:.1%} | {100 * (accuracy - base):+.1f} | {minutes(seconds)} |")
    for variant in args.variants:
        mine = [(a, s) for v, _, a, s in rows if v == variant]
        gain = sum(100 * (a - base) for a, _ in mine) / len(mine)
        accuracy = sum(a for a, _ in mine) / len(mine)
        seconds = sum(s for _, s in mine) / len(mine)
        print(f"| **{variant}, mean** | | {accuracy:.1%} | {gain:+.1f} | {minutes(seconds)} |")


if __name__ == "__main__":
    main()
