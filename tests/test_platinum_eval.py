"""Platinum evaluation (PlatinumEval): file schema, accuracy over resumed runs, DDP equals one process, in-fit eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from policy_phase_script import TinyTrainingModule, eval_parts, rollout_parts, trainer

from abel_lightning.callbacks.platinum_eval import PlatinumEval
from abel_lightning.callbacks.regime_w import RegimeWCollector
from abel_lightning.data.gsm8k import GSM8KDataModule, load_questions
from abel_lightning.jsonl import read_jsonl, write_jsonl_atomic
from abel_lightning.schemas import EVAL, ROLLOUT

SCRIPT = Path(__file__).with_name("policy_phase_script.py")
N = 6


def questions(shared_data: Path) -> list[dict]:
    return load_questions(str(shared_data / "gsm8k/train.jsonl"), "train", N)


def seed_correct_answers(path: Path, questions: list[dict]) -> None:
    """An earlier run's records, all correct, so that the accuracy is not trivially 0 for a random model."""
    records = [
        {
            "question_id": q["question_id"],
            "question": q["question"],
            "gold_answer": q["gold_answer"],
            "completion": f"The answer is {q['gold_answer']}",
            "answer": q["gold_answer"],
            "correct": True,
            "num_tokens": 5,
        }
        for q in questions
    ]
    write_jsonl_atomic(path, records, EVAL)


def run_eval(tiny_model: str, shared_data: Path, output_dir: Path, extra_callbacks: list | None = None) -> tuple:
    module, datamodule, evaluation = eval_parts(tiny_model, str(shared_data / "gsm8k/train.jsonl"), N, str(output_dir))
    run = trainer([evaluation, *(extra_callbacks or [])])
    run.test(module, datamodule=datamodule)
    return run, evaluation


def mean_correct(path: Path) -> float:
    records = read_jsonl(path, EVAL)
    return sum(r["correct"] for r in records) / len(records)


def test_eval_file_and_reported_accuracy(tiny_model, shared_data, tmp_path, capsys):
    output = tmp_path / "base_platinum_eval.jsonl"
    seed_correct_answers(output, questions(shared_data)[1:3])

    # A rollout collector on the same trainer stays out of the test loop.
    run, evaluation = run_eval(tiny_model, shared_data, tmp_path, [RegimeWCollector(str(tmp_path / "rollouts.jsonl"))])

    assert not (tmp_path / "rollouts.jsonl").exists()
    records = read_jsonl(output, EVAL)
    assert [r["question_id"] for r in records] == [q["question_id"] for q in questions(shared_data)]
    accuracy = mean_correct(output)
    assert accuracy >= 2 / N
    assert evaluation.accuracy == pytest.approx(accuracy)
    assert run.callback_metrics["platinum_accuracy"].item() == pytest.approx(accuracy)
    assert f"platinum_accuracy {accuracy:.4f}" in capsys.readouterr().out


class StopAfterFirstBatch(L.Callback):
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        raise KeyError("interrupted")


def test_interrupted_eval_resumes_and_reports_accuracy_over_all_questions(tiny_model, shared_data, tmp_path):
    output = tmp_path / "base_platinum_eval.jsonl"
    seed_correct_answers(output, questions(shared_data)[5:])
    with pytest.raises(KeyError, match="interrupted"):
        run_eval(tiny_model, shared_data, tmp_path, [StopAfterFirstBatch()])
    part = tmp_path / "base_platinum_eval.jsonl.part0"
    assert len(read_jsonl(part, EVAL)) == 2
    assert len(read_jsonl(output, EVAL)) == 1  # a crashed run does not merge

    _, evaluation = run_eval(tiny_model, shared_data, tmp_path)

    assert len(read_jsonl(output, EVAL)) == N
    assert not part.exists()
    assert evaluation.accuracy == pytest.approx(mean_correct(output))
    assert evaluation.accuracy >= 1 / N


@pytest.mark.slow
def test_two_ddp_ranks_write_and_score_what_one_process_does(tiny_model, shared_data, tmp_path):
    data = str(shared_data / "gsm8k/train.jsonl")
    ids = [q["question_id"] for q in questions(shared_data)]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    for folder in (one, two, resumed):
        folder.mkdir()
    for folder in (one, two):
        seed_correct_answers(folder / "base_platinum_eval.jsonl", questions(shared_data)[:1])
    module, datamodule, collector = rollout_parts(tiny_model, data, N, str(one / "rollouts.jsonl"))
    trainer([collector]).predict(module, datamodule=datamodule, return_predictions=False)
    _, evaluation = run_eval(tiny_model, shared_data, one)
    # One question left to answer: rank 1 gets none, skips the whole test loop, and must still join the merge and
    # the accuracy's all-reduce.
    kept = read_jsonl(one / "base_platinum_eval.jsonl", EVAL)[:-1]
    write_jsonl_atomic(resumed / "base_platinum_eval.jsonl", kept, EVAL)

    command = [
        sys.executable,
        str(SCRIPT),
        "--model",
        tiny_model,
        "--data",
        data,
        "--n-samples",
        str(N),
        "--devices",
        "2",
        "--phases",
        "predict,test",
        "--rollouts",
        str(two / "rollouts.jsonl"),
        "--eval-dirs",
        f"{two},{resumed}",
    ]
    # A stall guard for a deadlocked process group, not a time limit (a loaded machine takes minutes).
    ddp = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    assert "MEMBER: 2/2" in ddp.stderr

    assert [r["question_id"] for r in read_jsonl(two / "rollouts.jsonl", ROLLOUT)] == ids
    assert [r["question_id"] for r in read_jsonl(one / "rollouts.jsonl", ROLLOUT)] == ids
    for folder in (one, two, resumed):
        assert [r["question_id"] for r in read_jsonl(folder / "base_platinum_eval.jsonl", EVAL)] == ids
        assert not list(folder.glob("*.part*"))
    assert read_jsonl(resumed / "base_platinum_eval.jsonl", EVAL)[:-1] == kept
    for folder in (two, resumed):
        ddp_accuracy = json.loads((folder / "result.json").read_text())["platinum_accuracy"]
        # Earlier records are counted once (on rank 0), not once per rank.
        assert ddp_accuracy == pytest.approx(mean_correct(folder / "base_platinum_eval.jsonl"))
        assert ddp_accuracy == pytest.approx(evaluation.accuracy)


def test_every_n_steps_inside_fit(tiny_model, shared_data, tmp_path):
    data = str(shared_data / "gsm8k/train.jsonl")
    datamodule = GSM8KDataModule(dataset=data, split="train", n_samples=4, batch_size=2)
    evaluation = PlatinumEval(
        output_dir=str(tmp_path),
        every_n_steps=1,
        dataset=data,
        split="train",
        n_samples=3,
        batch_size=2,
        max_new_tokens=8,
    )
    run = trainer([evaluation], max_steps=2, log_every_n_steps=1)
    run.fit(TinyTrainingModule(tiny_model), datamodule=datamodule)

    for step in (1, 2):
        records = read_jsonl(tmp_path / f"tinytraining_step{step}_platinum_eval.jsonl", EVAL)
        assert len(records) == 3
    assert run.callback_metrics["val/platinum_accuracy"].item() == pytest.approx(
        mean_correct(tmp_path / "tinytraining_step2_platinum_eval.jsonl")
    )
