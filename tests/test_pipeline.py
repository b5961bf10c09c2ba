"""The whole pipeline on the packaged toy base, shortened for CI: it runs end to end, writes its report, and a killed
run resumes without redoing finished phases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from abel_lightning.jsonl import read_jsonl
from abel_lightning.pipeline import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def short_config(run_dir: Path) -> PipelineConfig:
    return PipelineConfig(
        run_dir=str(run_dir),
        ppo=str(ROOT / "configs/tiny/ppo.yaml"),
        rollouts=str(ROOT / "configs/tiny/rollouts.yaml"),
        dpo=str(ROOT / "configs/tiny/dpo.yaml"),
        eval=str(ROOT / "configs/tiny/eval.yaml"),
        toy_data={"n_train": 2000, "n_test": 100, "seed": 0},
        extra_args={
            "ppo": ["--data.init_args.n_samples", "16", *QUIET],
            "rollouts": ["--data.init_args.n_samples", "8", *QUIET],
            "dpo": ["--trainer.max_steps", "4", *QUIET],
            "eval": ["--data.init_args.n_samples", "20", *QUIET],
        },
    )


@pytest.mark.slow
def test_a_killed_pipeline_resumes_without_redoing_finished_phases(tmp_path):
    config = short_config(tmp_path)
    command = [
        sys.executable,
        "-m",
        "abel_lightning.cli",
        "pipeline",
        "--run_dir",
        str(tmp_path),
        "--ppo",
        config.ppo,
        "--rollouts",
        config.rollouts,
        "--dpo",
        config.dpo,
        "--eval",
        config.eval,
        "--toy_data",
        json.dumps(config.toy_data),
        "--extra_args",
        json.dumps(config.extra_args),
    ]
    # Its log goes to a file: a pipe nobody reads would stall the run once full.
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    state = tmp_path / "state.json"
    # Bounded by the run itself, not by seconds: it either finishes rollouts or ends.
    while not (state.exists() and "rollouts" in json.loads(state.read_text())["finished"]):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    log.close()
    rollouts = (tmp_path / "data/rollouts.jsonl").read_text()

    second = subprocess.run(command, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    for phase in ("ppo", "rollouts"):
        assert f"pipeline: {phase} is complete, skipping it" in second.stderr
    assert (tmp_path / "data/rollouts.jsonl").read_text() == rollouts
    assert json.loads(state.read_text())["finished"] == [
        "ppo",
        "rollouts",
        "preferences",
        "dpo",
        "eval_base",
        "eval_ppo",
        "eval_dpo",
    ]
    report = (tmp_path / "report.md").read_text()
    for model in ("base", "ppo_lora", "dpo_lora"):
        assert f"| {model} |" in report and "McNemar" in report and "## Preference pairs" in report
        records = read_jsonl(tmp_path / "eval" / f"{model}_platinum_eval.jsonl")
        assert len(records) == 20
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "ppo_curves.png").exists()
