"""Regime W rollouts (RegimeWCollector) and the resumable writer under it: schema, order, resume after a kill."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from policy_phase_script import K, TinyTrainingModule, rollout_parts, trainer

from abel_lightning.answers import extract_answer, is_correct
from abel_lightning.callbacks.regime_w import RegimeWCollector
from abel_lightning.callbacks.resumable_jsonl import ResumableJsonl, source_row
from abel_lightning.data.gsm8k import GSM8KDataModule, load_questions
from abel_lightning.jsonl import read_jsonl
from abel_lightning.schemas import ROLLOUT

SCRIPT = Path(__file__).with_name("policy_phase_script.py")
N = 6


def expected_ids(shared_data: Path) -> list[str]:
    return [q["question_id"] for q in load_questions(str(shared_data / "gsm8k/train.jsonl"), "train", N)]


def run_rollouts(tiny_model: str, shared_data: Path, output: Path) -> None:
    module, datamodule, collector = rollout_parts(tiny_model, str(shared_data / "gsm8k/train.jsonl"), N, str(output))
    trainer([collector]).predict(module, datamodule=datamodule, return_predictions=False)


def test_rollouts_file_has_one_scored_record_per_question_in_source_order(tiny_model, shared_data, tmp_path):
    output = tmp_path / "data" / "rollouts.jsonl"
    run_rollouts(tiny_model, shared_data, output)

    records = read_jsonl(output, ROLLOUT)
    assert [r["question_id"] for r in records] == expected_ids(shared_data)
    assert not list(output.parent.glob("*.part*"))
    for record in records:
        assert len(record["trajectories"]) == K
        assert 0.0 <= record["s_wm"] <= 1.0
        for trajectory in record["trajectories"]:
            assert trajectory["answer"] == extract_answer(trajectory["full_text"])
            assert trajectory["correct"] == is_correct(trajectory["answer"], record["gold_answer"])
            assert 0 <= trajectory["num_tokens"] <= 8
            assert trajectory["arm"] == 0


def test_rerun_of_a_finished_file_answers_nothing(tiny_model, shared_data, tmp_path, capsys):
    output = tmp_path / "rollouts.jsonl"
    run_rollouts(tiny_model, shared_data, output)
    first = output.read_bytes()
    capsys.readouterr()

    run_rollouts(tiny_model, shared_data, output)
    assert output.read_bytes() == first
    assert "questions this run" in capsys.readouterr().out


def test_resumable_jsonl_merges_parts_deduplicated_in_source_order(tmp_path):
    path = tmp_path / "out.jsonl"

    def record(row: int, text: str = "x") -> dict:
        return {
            "question_id": f"train/{row}",
            "question": "q",
            "gold_answer": "1",
            "completion": text,
            "answer": None,
            "correct": False,
            "num_tokens": 1,
        }

    path.write_text(json.dumps(record(30)) + "\n")
    # Parts from an earlier run on 3 ranks, one cut off mid-line, one repeating a question already in P.
    (tmp_path / "out.jsonl.part0").write_text(json.dumps(record(7)) + "\n" + json.dumps(record(100)) + "\n")
    (tmp_path / "out.jsonl.part2").write_text(json.dumps(record(30, "again")) + "\n" + '{"question_id": "train/5')
    (tmp_path / "out.jsonl.partial").write_text("not a part file")
    writer = ResumableJsonl(path, {"question_id": str}, rank=0)

    assert [r["question_id"] for r in writer.read()] == ["train/7", "train/30", "train/100"]
    merged = writer.merge()
    assert [r["question_id"] for r in read_jsonl(path)] == ["train/7", "train/30", "train/100"]
    assert merged[1]["completion"] == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.partial"]
    assert source_row("test/1318") == 1318
    with pytest.raises(ValueError, match="<split>/<row>"):
        source_row("1318")


def test_a_second_writer_on_one_path_takes_its_own_part_and_an_early_merge_keeps_it(tmp_path):
    # Two runs of the same command on one output: both are rank 0, neither may write into or delete the other's part.
    path = tmp_path / "out.jsonl"
    first, second = (ResumableJsonl(path, {"question_id": str}, rank=0) for _ in range(2))
    first.append([{"question_id": "train/3"}])
    second.append([{"question_id": "train/1"}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl.part0", "out.jsonl.part1"]

    first.close()
    assert [r["question_id"] for r in first.merge()] == ["train/1", "train/3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.part1"]  # still being written

    second.append([{"question_id": "train/2"}])
    second.close()
    assert [r["question_id"] for r in second.merge()] == ["train/1", "train/2", "train/3"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_without_file_locks_one_run_still_writes_and_merges_with_a_warning(tmp_path, monkeypatch, caplog):
    # Lustre mounted without flock answers ENOSYS: a single run must not fail for it.
    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    writer = ResumableJsonl(tmp_path / "out.jsonl", {"question_id": str}, rank=0)
    writer.append([{"question_id": "train/2"}, {"question_id": "train/1"}])
    writer.close()
    assert [r["question_id"] for r in writer.merge()] == ["train/1", "train/2"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    assert "no file locks" in caplog.text


@pytest.mark.slow
def test_killed_rollouts_resume_without_loss_or_repeat(tiny_model, shared_data, tmp_path):
    output = tmp_path / "rollouts.jsonl"
    part = tmp_path / "rollouts.jsonl.part0"
    command = [
        sys.executable,
        str(SCRIPT),
        "--model",
        tiny_model,
        "--data",
        str(shared_data / "gsm8k/train.jsonl"),
        "--n-samples",
        str(N),
        "--rollouts",
        str(output),
        "--pause-after-first-batch",
        "3600",  # until killed
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Bounded by the process, not by seconds: it either writes its first batch or ends.
        while not (part.exists() and part.read_bytes().count(b"\n") >= 2):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()

    assert not output.exists()
    survivors = read_jsonl(part, ROLLOUT)
    assert len(survivors) == 2  # the first batch of 2 questions
    # What a kill in the middle of the next write leaves behind.
    with open(part, "a") as file:
        file.write('{"question_id": "train/99999", "question": "cut off')

    run_rollouts(tiny_model, shared_data, output)

    records = read_jsonl(output, ROLLOUT)
    assert [r["question_id"] for r in records] == expected_ids(shared_data)
    by_id = {r["question_id"]: r for r in records}
    for survivor in survivors:
        assert by_id[survivor["question_id"]] == survivor  # kept as written, not sampled again
    assert not part.exists()


def test_rollouts_after_fit_from_the_training_policy(tiny_model, shared_data, tmp_path):
    output = tmp_path / "rollouts.jsonl"
    data = str(shared_data / "gsm8k/train.jsonl")
    datamodule = GSM8KDataModule(dataset=data, split="train", n_samples=4, batch_size=2)
    collector = RegimeWCollector(output=str(output), after_fit=True, samples_per_question=2, batch_size=3)
    trainer([collector], max_steps=1).fit(TinyTrainingModule(tiny_model), datamodule=datamodule)

    records = read_jsonl(output, ROLLOUT)
    assert [r["question_id"] for r in records] == [q["question_id"] for q in datamodule.questions]
    assert all(len(r["trajectories"]) == 2 for r in records)


@pytest.mark.slow
def test_two_processes_on_one_output_path_answer_every_question_once(tiny_model, shared_data, tmp_path):
    output = tmp_path / "rollouts.jsonl"
    command = [sys.executable, str(SCRIPT), "--model", tiny_model, "--data", str(shared_data / "gsm8k/train.jsonl")]
    command += ["--n-samples", str(N), "--rollouts", str(output)]
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for process in processes:
        _, stderr = process.communicate()
        assert process.returncode == 0, stderr.decode()[-3000:]

    records = read_jsonl(output, ROLLOUT)
    assert sorted(r["question_id"] for r in records) == sorted(expected_ids(shared_data))
