"""report.md's pieces: the paired McNemar table and the smoothed reward line, against numbers worked out by hand."""

from __future__ import annotations

import json

import pytest

from abel_lightning.compare import compare
from abel_lightning.report import PPO_CURVES, ema, mcnemar_markdown, plot_curves


def test_ema_is_bias_corrected():
    # m1 = 0.5 * 1 = 0.5 -> 0.5 / 0.5 = 1; m2 = 0.5 * 0.5 + 0.5 * 3 = 1.75 -> 1.75 / 0.75 = 7/3.
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, 7 / 3])
    assert ema([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)


def test_the_report_lists_each_pair_of_models_once(tmp_path):
    paths = []
    for name, correct in (("base", [True, False, False, False]), ("ppo_lora", [True, True, True, False])):
        path = tmp_path / f"{name}_platinum_eval.jsonl"
        rows = [
            {"question_id": f"test/{i}", "question": "q", "gold_answer": "1", "completion": "c"}
            | {"answer": "1" if c else "2", "correct": c, "num_tokens": 3}
            for i, c in enumerate(correct)
        ]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(str(path))
    # Only ppo_lora is right on questions 1 and 2: b = 0, c = 2, p = 2 * 1/4 = 0.5.
    assert mcnemar_markdown(compare(paths, n_bootstrap=100))[2:] == ["| base | ppo_lora | 4 | 0 | 2 | 0.5 |"]


def test_the_ppo_curves_plot_with_the_smoothed_reward(tmp_path):
    rows = [{"step": str(i), "reward": str(i % 3 / 2), "kl": ""} for i in range(10)]
    assert plot_curves(rows, PPO_CURVES, "PPO", tmp_path / "ppo.png") == tmp_path / "ppo.png"
    assert (tmp_path / "ppo.png").stat().st_size > 0
