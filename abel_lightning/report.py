"""The run report of a pipeline: ``report.md`` with the accuracy table and the paired McNemar tests, plus PNG plots of
the training curves (PPO's reward with a smoothed line)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from abel_lightning.bandit import arm_statistics, arm_statistics_markdown, plot_arm_statistics  # noqa: E402
from abel_lightning.compare import compare, mcnemar_pairs  # noqa: E402
from abel_lightning.jsonl import read_jsonl  # noqa: E402
from abel_lightning.schemas import PAIR, PAIR_KINDS, ROLLOUT  # noqa: E402

# The PPO reward per iteration is a mean over one batch's samples (32 on the toy run), noisy enough that a smoothed line
# is what shows the trend; the raw points stay beside it.
SMOOTHED = {"reward"}
EMA_WEIGHT = 0.9
PPO_CURVES = {"reward": "mean reward", "kl": "KL to reference (nats / sequence)"}
DPO_CURVES = {"train/loss": "DPO loss", "train/reward_accuracy": "reward accuracy"}


def read_metrics(folder: Path) -> list[dict[str, str]]:
    """Rows of every ``metrics.csv`` a CSVLogger wrote under ``folder`` (resumed runs add versions)."""
    rows: list[dict[str, str]] = []
    for path in sorted(folder.rglob("metrics.csv")):
        with path.open() as file:
            rows += list(csv.DictReader(file))
    return rows


def ema(values: list[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing): ``m_t = w m_{t-1} + (1 - w) x_t``,
    shown as ``m_t / (1 - w^t)`` so that the first points are not pulled towards 0. ``ema([1, 3], 0.5)`` -> [1, 7/3]."""
    smoothed, mean = [], 0.0
    for t, value in enumerate(values, start=1):
        mean = weight * mean + (1 - weight) * value
        smoothed.append(mean / (1 - weight**t))
    return smoothed


def mcnemar_markdown(results: list[dict]) -> list[str]:
    """The paired exact McNemar tests of :func:`abel_lightning.compare.compare`'s rows as a Markdown table."""
    lines = ["| A | B | common questions | only A right | only B right | p-value |", "|---|---|---|---|---|---|"]
    for a, b, test in mcnemar_pairs(results):
        lines.append(
            f"| {a} | {b} | {test['n_common']} | {test['only_this']} | {test['only_other']} | {test['p_value']:.4g} |"
        )
    return lines


def plot_curves(rows: list[dict[str, str]], curves: dict[str, str], title: str, png: Path) -> Path | None:
    present = {key: label for key, label in curves.items() if any(row.get(key) for row in rows)}
    if not present:
        return None
    figure, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.5), squeeze=False)
    for axis, (key, label) in zip(axes[0], present.items()):
        points = [(int(row["step"]), float(row[key])) for row in rows if row.get(key)]
        steps, values = [p[0] for p in points], [p[1] for p in points]
        if key in SMOOTHED:
            axis.plot(steps, values, marker=".", alpha=0.35, label="per iteration")
            axis.plot(steps, ema(values), label=f"EMA ({EMA_WEIGHT})")
            axis.legend()
        else:
            axis.plot(steps, values, marker=".")
        axis.set_xlabel("step")
        axis.set_title(label)
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return png


def write_report(run) -> Path:
    """Write ``<run_dir>/report.md`` (and its PNGs) for a finished ``pipeline.Run``; print the accuracy table."""
    root = run.root
    evals = [
        run.eval_dir / f"{name}_platinum_eval.jsonl" for name in ("base", run.ppo_adapter.name, run.dpo_adapter.name)
    ]
    results = compare([str(p) for p in evals if p.exists()], str(root / "accuracy.png"))
    lines = [
        "# abel-lightning run report",
        "",
        "## Accuracy (greedy decoding, held-out questions)",
        "",
        "| model | accuracy | 95% interval | n |",
        "|---|---|---|---|",
    ]
    for row in results:
        lines.append(
            f"| {row['model']} | {row['accuracy']:.1%} | {row['ci_low']:.1%} – {row['ci_high']:.1%} | {row['n']} |"
        )
    lines += ["", "![accuracy](accuracy.png)", ""]
    if len(results) > 1:
        lines += ["## Paired exact McNemar tests (questions both models answered)", "", *mcnemar_markdown(results), ""]
    if run.pairs.exists():
        pairs = read_jsonl(run.pairs, PAIR)
        counts = ", ".join(f"{sum(p['kind'] == kind for p in pairs)} {kind}" for kind in PAIR_KINDS)
        threshold = run.config.preference_threshold
        lines += ["## Preference pairs", "", f"{counts} (coherence: a reward gap above {threshold:g})", ""]
    stats = arm_statistics(read_jsonl(run.rollouts, ROLLOUT)) if run.rollouts.exists() else []
    if stats:
        plot_arm_statistics(stats, root / "arms.png")
        lines += ["## Regime W arms (rollouts)", "", *arm_statistics_markdown(stats), "", "![arms](arms.png)", ""]
    for name, curves, title in (("ppo", PPO_CURVES, "PPO"), ("dpo", DPO_CURVES, "DPO")):
        png = plot_curves(read_metrics(run.logs / name), curves, title, root / f"{name}_curves.png")
        if png is not None:
            lines += [f"## {title} training", "", f"![{name}]({png.name})", ""]
    report = root / "report.md"
    report.write_text("\n".join(lines))
    return report
