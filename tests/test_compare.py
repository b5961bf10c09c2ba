"""compare(): accuracy, bootstrap interval and exact McNemar p-values on hand-made evaluation files."""

from __future__ import annotations

from math import comb
from pathlib import Path

import pytest

from abel_lightning.compare import bootstrap_interval, compare, mcnemar_exact, model_name
from abel_lightning.jsonl import write_jsonl_atomic
from abel_lightning.schemas import EVAL


def write_eval(path: Path, outcomes: dict[int, bool]) -> str:
    records = [
        {
            "question_id": f"test/{row}",
            "question": "q",
            "gold_answer": "1",
            "completion": "c",
            "answer": "1" if right else "2",
            "correct": right,
            "num_tokens": 3,
        }
        for row, right in outcomes.items()
    ]
    write_jsonl_atomic(path, records, EVAL)
    return str(path)


def binomial_quantile(n: int, p: float, q: float) -> float:
    """Smallest k/n with P(X <= k) >= q for X ~ Binomial(n, p)."""
    cumulative = 0.0
    for k in range(n + 1):
        cumulative += comb(n, k) * p**k * (1 - p) ** (n - k)
        if cumulative >= q:
            return k / n
    return 1.0


def test_mcnemar_matches_the_hand_worked_values():
    # 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * 56 / 1024
    assert mcnemar_exact(8, 2) == 0.109375
    assert mcnemar_exact(2, 8) == 0.109375
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(6, 0) == 2 / 64
    assert mcnemar_exact(700, 600) < 0.01  # big integers stay exact


def test_bootstrap_interval():
    assert bootstrap_interval(20, 20) == (1.0, 1.0)
    low, high = bootstrap_interval(13, 20, n_bootstrap=20000, seed=3)
    assert low == pytest.approx(binomial_quantile(20, 0.65, 0.025), abs=0.05)
    assert high == pytest.approx(binomial_quantile(20, 0.65, 0.975), abs=0.05)
    assert bootstrap_interval(13, 20, seed=1) == bootstrap_interval(13, 20, seed=1)


def test_compare_eval_files(tmp_path, capsys):
    # On the 20 common questions: 5 both right, 8 only base right, 2 only dpo right, 5 both wrong.
    pattern = [(True, True)] * 5 + [(True, False)] * 8 + [(False, True)] * 2 + [(False, False)] * 5
    base = write_eval(tmp_path / "base_platinum_eval.jsonl", {i: a for i, (a, _) in enumerate(pattern)})
    # dpo also answered one question base did not; McNemar only pairs the common ones.
    dpo_outcomes = {i: b for i, (_, b) in enumerate(pattern)} | {20: True}
    dpo = write_eval(tmp_path / "abel_dpo_lora_platinum_eval.jsonl", dpo_outcomes)
    png = tmp_path / "plots" / "compare.png"

    rows = compare([base, dpo], out_png=str(png), n_bootstrap=2000, seed=0)

    assert [r["model"] for r in rows] == ["base", "abel_dpo_lora"]
    assert (rows[0]["n"], rows[0]["correct"], rows[0]["accuracy"]) == (20, 13, 0.65)
    assert (rows[1]["n"], rows[1]["correct"], rows[1]["accuracy"]) == (21, 8, pytest.approx(8 / 21))
    for row in rows:
        assert row["ci_low"] <= row["accuracy"] <= row["ci_high"]
    assert rows[0]["mcnemar"]["abel_dpo_lora"] == {"n_common": 20, "only_this": 8, "only_other": 2, "p_value": 0.109375}
    assert rows[1]["mcnemar"]["base"]["p_value"] == 0.109375
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "0.6500" in printed and "0.1094" in printed


def test_model_names_and_errors(tmp_path):
    assert model_name("outputs/abel_ppo_lora_platinum_eval.jsonl") == "abel_ppo_lora"
    assert model_name("elsewhere/run3.jsonl") == "run3"
    (tmp_path / "a").mkdir()
    first = write_eval(tmp_path / "base_platinum_eval.jsonl", {0: True})
    second = write_eval(tmp_path / "a" / "base_platinum_eval.jsonl", {0: False})
    with pytest.raises(ValueError, match="rename one"):
        compare([first, second])
    twice = tmp_path / "twice_platinum_eval.jsonl"
    twice.write_text(Path(first).read_text() * 2)
    with pytest.raises(ValueError, match=r"twice_platinum_eval.jsonl:2: question_id 'test/0' appears twice"):
        compare([str(twice)])
