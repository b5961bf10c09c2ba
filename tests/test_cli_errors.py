"""Known failures through the CLI: one line on stderr saying what is wrong and what to do, exit status 2, the
traceback behind --debug; every case fails before any training starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abel_lightning import cli
from abel_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]


def one_line_failure(argv: list[str], capsys) -> str:
    """Run the CLI on ``argv``; assert it exits with status 2 and no traceback, and return its error line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("abel-lightning: error:")]
    assert len(lines) == 1, err
    return lines[0]


def fit_args(model: str, data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(ROOT / "configs/tiny/ppo.yaml"),
        "--model.init_args.model",
        model,
        "--data.init_args.dataset",
        str(data),
        "--data.init_args.n_samples",
        "2",
        "--trainer.callbacks.init_args.dirpath",
        str(tmp_path / "adapter"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        *extra,
    ]


@pytest.fixture
def questions(tmp_path) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) + "\n")
    return path


@pytest.fixture
def saved_adapter(tiny_model, tmp_path) -> Path:
    from abel_lightning.models.loading import LoraSettings, attach_lora, load_base, load_tokenizer, save_adapter

    policy = attach_lora(load_base(tiny_model, "float32"), LoraSettings(r=2, alpha=4))
    return save_adapter(policy, load_tokenizer(tiny_model), tmp_path / "saved_adapter")


def test_a_missing_local_model_path_is_reported_without_asking_the_hub(tmp_path, questions, capsys):
    missing = str(tmp_path / "no" / "such-model")
    line = one_line_failure(fit_args(missing, questions, tmp_path), capsys)
    assert missing in line and "no such model folder" in line


def test_an_adapter_folder_without_weights(tiny_model, saved_adapter, questions, tmp_path, capsys):
    (saved_adapter / "adapter_model.safetensors").unlink()
    argv = fit_args(tiny_model, questions, tmp_path, "--model.init_args.adapter", str(saved_adapter))
    assert "no adapter_model.safetensors" in one_line_failure(argv, capsys)


def test_a_truncated_adapter_weights_file_is_named(tiny_model, saved_adapter, questions, tmp_path, capsys):
    weights = saved_adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    argv = fit_args(tiny_model, questions, tmp_path, "--model.init_args.adapter", str(saved_adapter))
    line = one_line_failure(argv, capsys)
    assert f"{weights}: truncated or corrupt" in line and "re-download or re-save" in line


def test_a_bad_adapter_config_is_located_by_line(tiny_model, saved_adapter, questions, tmp_path, capsys):
    config = saved_adapter / "adapter_config.json"
    config.write_text('{\n  "r": 2,\n  "lora_alpha": 4,,\n}\n')
    argv = fit_args(tiny_model, questions, tmp_path, "--model.init_args.adapter", str(saved_adapter))
    assert f"{config}:3:" in one_line_failure(argv, capsys)


def test_a_missing_rollouts_file(tmp_path, capsys):
    missing = tmp_path / "rollouts.jsonl"
    line = one_line_failure(["preferences", "--rollouts", str(missing), "--out", str(tmp_path / "p.jsonl")], capsys)
    assert f"{missing}: no such file or directory" in line


def test_a_missing_pipeline_phase_config(tmp_path, capsys):
    missing = tmp_path / "ppo.yaml"
    argv = ["pipeline", "--run_dir", str(tmp_path / "run"), "--toy_data", "null", "--ppo", str(missing)]
    assert f"{missing}: no such file or directory" in one_line_failure(argv, capsys)


def test_a_missing_compare_input(tmp_path, capsys):
    missing = tmp_path / "base_platinum_eval.jsonl"
    line = one_line_failure(["compare", str(missing), "--out", str(tmp_path / "c.png")], capsys)
    assert f"{missing}: no such file or directory" in line


def test_an_out_of_range_number_in_rollouts_names_file_line_and_field(tmp_path, capsys):
    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text('{"question_id": "train/0", "trajectories": [{"reward": 1.0}, {"reward": 1e400}]}\n')
    line = one_line_failure(["preferences", "--rollouts", str(rollouts), "--out", str(tmp_path / "p.jsonl")], capsys)
    assert f"{rollouts}:1: field 'trajectories[1].reward'" in line and "'1e400'" in line


def test_debug_flag_and_variable_show_the_traceback(tmp_path, monkeypatch):
    argv = ["preferences", "--rollouts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "p.jsonl")]
    with pytest.raises(FileNotFoundError):
        main([*argv, "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError):
        main(argv)


def test_an_unknown_exception_is_a_bug_and_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr("abel_lightning.preferences.write_preferences", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["preferences", "--rollouts", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "p.jsonl")])
