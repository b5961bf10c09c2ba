"""Compare evaluation files (base vs PPO vs DPO): accuracy with a 95% bootstrap interval per model, and an exact
McNemar test for each pair of models on the questions both answered.

    abel-lightning compare outputs/*_platinum_eval.jsonl --out outputs/compare.png
"""

from __future__ import annotations

from math import comb
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from abel_lightning.callbacks.platinum_eval import SUFFIX
from abel_lightning.jsonl import read_jsonl
from abel_lightning.schemas import EVAL


def model_name(path: str | Path) -> str:
    """``outputs/abel_dpo_lora_platinum_eval.jsonl`` -> ``abel_dpo_lora``; another file name loses its extension."""
    name = Path(path).name
    return name.removesuffix(SUFFIX) if name.endswith(SUFFIX) else Path(name).stem


def bootstrap_interval(
    correct: int, n: int, n_bootstrap: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of an accuracy of ``correct`` out of ``n``.

    Resampling n right/wrong outcomes with replacement and taking their mean is distributed exactly as
    ``Binomial(n, correct/n) / n``, so the ``n_bootstrap`` resamples are drawn from that directly (no n x n_bootstrap
    index matrix). Example: 20 of 20 -> (1.0, 1.0); 13 of 20 -> about (0.45, 0.85).
    """
    if n == 0:
        return float("nan"), float("nan")
    means = np.random.default_rng(seed).binomial(n, correct / n, size=n_bootstrap) / n
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` questions only model A got right and ``c`` only model B got right.

    Under the null each discordant question is a fair coin, so with ``n = b + c``:
    ``p = min(1, 2 * sum_{i <= min(b, c)} C(n, i) / 2^n)``.
    Example: b = 8, c = 2 -> 2 * (1 + 10 + 45) / 1024 = 0.109375. No discordant question -> 1.0.
    """
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(b, c) + 1))
    # Exact integers until the one division (Python divides big integers correctly rounded).
    return min(1.0, 2 * tail / 2**n)


def load_eval(path: str | Path) -> dict[str, bool]:
    """``question_id -> correct`` of one evaluation file; a question written twice is an error."""
    outcomes: dict[str, bool] = {}
    for line, record in enumerate(read_jsonl(path, EVAL), start=1):
        if record["question_id"] in outcomes:
            raise ValueError(
                f"{path}:{line}: question_id {record['question_id']!r} appears twice; an evaluation file has one "
                "record per question (rerun the evaluation, which merges and deduplicates its output)"
            )
        outcomes[record["question_id"]] = record["correct"]
    return outcomes


def compare(paths: list[str], out_png: str | None = None, n_bootstrap: int = 10000, seed: int = 0) -> list[dict]:
    """Compare evaluation files; prints the tables, writes the plot to ``out_png`` (when given) and returns one dict
    per model, in the order of ``paths``::

        {"model", "path", "n", "correct", "accuracy", "ci_low", "ci_high",
         "mcnemar": {other_model: {"n_common", "only_this", "only_other", "p_value"}}}

    ``only_this`` counts the common questions this model got right and the other wrong.
    """
    if not paths:
        raise ValueError("compare needs at least one evaluation file (outputs/<name>_platinum_eval.jsonl)")
    outcomes: dict[str, dict[str, bool]] = {}
    sources: dict[str, str] = {}
    for path in paths:
        name = model_name(path)
        if name in outcomes:
            raise ValueError(f"{sources[name]} and {path} both name a model {name!r}; rename one of the files")
        outcomes[name], sources[name] = load_eval(path), str(path)

    rows = []
    for name, results in outcomes.items():
        correct, n = sum(results.values()), len(results)
        low, high = bootstrap_interval(correct, n, n_bootstrap, seed)
        rows.append(
            {
                "model": name,
                "path": sources[name],
                "n": n,
                "correct": correct,
                "accuracy": correct / n if n else float("nan"),
                "ci_low": low,
                "ci_high": high,
                "mcnemar": {},
            }
        )
    for row in rows:
        for other, other_results in outcomes.items():
            if other == row["model"]:
                continue
            mine = outcomes[row["model"]]
            common = mine.keys() & other_results.keys()
            only_this = sum(mine[q] and not other_results[q] for q in common)
            only_other = sum(other_results[q] and not mine[q] for q in common)
            row["mcnemar"][other] = {
                "n_common": len(common),
                "only_this": only_this,
                "only_other": only_other,
                "p_value": mcnemar_exact(only_this, only_other),
            }

    _print_tables(rows)
    if out_png is not None:
        plot(rows, out_png)
    return rows


def mcnemar_pairs(rows: list[dict]):
    """Each unordered pair of models of :func:`compare`'s rows once, in row order: ``(model A, model B, test)``, with
    ``test["only_this"]`` counting the questions only A got right."""
    for i, row in enumerate(rows):
        for other in rows[i + 1 :]:
            yield row["model"], other["model"], row["mcnemar"][other["model"]]


def _print_tables(rows: list[dict]) -> None:
    console = Console()
    models = Table(title="accuracy (95% bootstrap interval)")
    for column in ("model", "questions", "correct", "accuracy", "95% interval"):
        models.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        models.add_row(
            row["model"],
            str(row["n"]),
            str(row["correct"]),
            f"{row['accuracy']:.4f}",
            f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]",
        )
    console.print(models)
    if len(rows) < 2:
        return
    pairs = Table(title="Exact McNemar tests on the questions both answered")
    for column in ("A", "B", "common", "only A", "only B", "p-value"):
        pairs.add_column(column, justify="left" if column in ("A", "B") else "right")
    for a, b, test in mcnemar_pairs(rows):
        pairs.add_row(
            a, b, str(test["n_common"]), str(test["only_this"]), str(test["only_other"]), f"{test['p_value']:.4g}"
        )
    console.print(pairs)


def plot(rows: list[dict], out_png: str | Path) -> Path:
    """Bar plot of the accuracies with their bootstrap intervals as error bars, written as a PNG."""
    # A bare Figure renders with Agg and leaves pyplot's global backend alone (no display needed).
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.6 * len(rows) + 2, 4), layout="constrained")
    axes = figure.subplots()
    names = [row["model"] for row in rows]
    accuracy = np.array([row["accuracy"] for row in rows])
    errors = np.array([accuracy - [row["ci_low"] for row in rows], [row["ci_high"] for row in rows] - accuracy])
    bars = axes.bar(names, accuracy, yerr=errors, capsize=6, color="#4C72B0")
    axes.bar_label(bars, labels=[f"{a:.3f}" for a in accuracy], label_type="center", color="white")
    axes.set_ylim(0, 1)
    axes.set_ylabel("accuracy")
    axes.set_title("accuracy on the evaluated questions (95% bootstrap intervals)")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    return out
