"""Inputs that parse but hold nothing to learn from, refused at the CLI with file:line (docs/FORMATS.md, "What the
input checks refuse"): empty files, a repeated question, a record without trajectories, unusable preference pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import rollout
from test_cli_errors import ROOT, one_line_failure

from abel_lightning.preferences import build_pairs


def write_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def preferences(rollouts: Path, tmp_path: Path) -> list[str]:
    return ["preferences", "--rollouts", str(rollouts), "--out", str(tmp_path / "pairs.jsonl")]


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_an_empty_or_blank_rollouts_file(tmp_path, capsys, content):
    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text(content)
    line = one_line_failure(preferences(rollouts, tmp_path), capsys)
    assert f"{rollouts}: no records" in line
    assert not (tmp_path / "pairs.jsonl").exists()


def test_a_repeated_question_id(tmp_path, capsys):
    records = [rollout("train/0", [(1.0, True), (0.0, False)])] * 2
    rollouts = write_lines(tmp_path / "rollouts.jsonl", records)
    line = one_line_failure(preferences(rollouts, tmp_path), capsys)
    assert f"{rollouts}:2: field 'question_id': expected a question_id not already on line 1" in line


def test_a_record_without_trajectories(tmp_path, capsys):
    rollouts = write_lines(tmp_path / "rollouts.jsonl", [rollout("train/0", [(1.0, True)]), rollout("train/1", [])])
    assert f"{rollouts}:2: field 'trajectories'" in one_line_failure(preferences(rollouts, tmp_path), capsys)


def test_phase_3_never_pairs_blank_or_identical_texts():
    record = rollout("train/0", [(1.0, True), (0.9, True), (0.0, False), (0.0, False)])
    record["trajectories"][1]["full_text"] = "  \n"  # a blank correct one: no coherence pair with it
    record["trajectories"][2]["full_text"] = record["trajectories"][0]["full_text"]  # wrong, yet the same text
    pairs = build_pairs([record], threshold=0.0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("solution 0", "solution 3")]


def pair(chosen: str, rejected: str) -> dict:
    return {"question_id": "test/0", "prompt": "Q", "chosen": chosen, "rejected": rejected, "kind": "correctness"} | {
        "reward_gap": 1.0
    }


@pytest.mark.parametrize(
    ("bad", "field"),
    [(pair("", "#### 3"), "chosen"), (pair("#### 7", " "), "rejected"), (pair("#### 7", "#### 7"), "rejected")],
)
def test_dpo_refuses_unusable_pairs(tiny_model, tmp_path, capsys, bad, field):
    pairs = write_lines(tmp_path / "pairs.jsonl", [pair("#### 7", "#### 3"), bad])
    argv = [
        "fit",
        "--config",
        str(ROOT / "configs/tiny/dpo.yaml"),
        "--model.init_args.model",
        tiny_model,
        "--model.init_args.adapter",
        "null",
        "--data.init_args.pairs",
        str(pairs),
        "--data.init_args.rollouts",
        "null",
        "--trainer.logger",
        "false",
        "--trainer.callbacks",
        "[]",
    ]
    assert f"{pairs}:2: field '{field}'" in one_line_failure(argv, capsys)


@pytest.mark.parametrize("command", ["test", "predict"])
def test_an_empty_gsm8k_file_for_predict_and_test(tiny_model, tmp_path, capsys, command):
    empty = tmp_path / "test.jsonl"
    empty.write_text("\n")
    argv = [
        command,
        "--config",
        str(ROOT / "configs/tiny/eval.yaml"),
        "--model.init_args.model",
        tiny_model,
        "--data.init_args.dataset",
        str(empty),
        "--trainer.callbacks",
        "[]",
    ]
    assert f"{empty}: no records" in one_line_failure(argv, capsys)
