"""The `abel-lightning` entry point: help, and the commands that are not Lightning loops."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from abel_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "preferences", "compare", "pipeline"):
        assert f"  {command} " in out


def rollout(question_id: str, rewards_correct: list[tuple[float, bool]]) -> dict:
    trajectories = [
        {
            "full_text": f"solution {i}",
            "answer": "1" if ok else "2",
            "num_tokens": 10,
            "reward": r,
            "correct": ok,
            "arm": 0,
        }
        for i, (r, ok) in enumerate(rewards_correct)
    ]
    return {
        "question_id": question_id,
        "question": "q",
        "prompt": "p",
        "gold_answer": "1",
        "s_end": 0.5,
        "s_path": 1.0,
        "s_cf": 1.0,
        "s_wm": 0.75,
        "trajectories": trajectories,
    }


def test_preferences_command_writes_pairs_and_prints_both_counts(tmp_path):
    rollouts, out = tmp_path / "rollouts.jsonl", tmp_path / "pairs.jsonl"
    records = [
        rollout("train/0", [(1.10, True), (1.05, True), (0.0, False)]),  # 2 correctness + 1 coherence pair
        rollout("train/1", [(1.0, True), (0.1, False), (0.0, False)]),
    ]  # 2 correctness pairs
    rollouts.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = subprocess.run(
        [sys.executable, "-m", "abel_lightning.cli", "preferences", "--rollouts", str(rollouts), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "4 correctness pairs, 1 coherence pairs from 2 questions" in result.stdout
    assert len(out.read_text().splitlines()) == 5


def test_compare_takes_the_shell_glob_as_paths(tmp_path, capsys):
    for name, correct in (("base", [True, False, False, False]), ("ppo_lora", [True, True, True, False])):
        rows = [
            {
                "question_id": f"test/{i}",
                "question": "q",
                "gold_answer": "1",
                "completion": "c",
                "answer": "1" if c else "2",
                "correct": c,
                "num_tokens": 3,
            }
            for i, c in enumerate(correct)
        ]
        (tmp_path / f"{name}_platinum_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(
        [
            "compare",
            str(tmp_path / "base_platinum_eval.jsonl"),
            str(tmp_path / "ppo_lora_platinum_eval.jsonl"),
            "--out",
            str(tmp_path / "compare.png"),
            "--n_bootstrap",
            "200",
        ]
    )
    out = capsys.readouterr().out
    assert "base" in out and "ppo_lora" in out and "0.7500" in out
    assert (tmp_path / "compare.png").exists()


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp", "cpu"])
@pytest.mark.parametrize(
    "command, config",
    [("fit", "ppo"), ("fit", "ppo_fast"), ("fit", "dpo"), ("predict", "rollouts"), ("test", "eval")],
)
def test_every_phase_config_parses_with_every_strategy_file(command, config, strategy, capsys):
    """One GPU to eight is a config change: each phase's config combined with each strategy file must be a valid
    command line (parsed, not run: the strategies need GPUs)."""
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                command,
                "--config",
                str(ROOT / f"configs/{config}.yaml"),
                "--config",
                str(ROOT / f"configs/strategy/{strategy}.yaml"),
                "--print_config",
            ]
        )
    assert exit_.value.code in (0, None)
    assert "class_path: lightning.pytorch.strategies" in capsys.readouterr().out or strategy in ("single", "cpu")


def test_the_fast_ppo_config_is_the_seeds_but_for_its_marked_lines():
    """configs/ppo_fast.yaml is configs/ppo.yaml with the rollout batch split from the update minibatch: a change to
    the seed's config that the fast one misses fails here."""
    import yaml

    seed, fast = (yaml.safe_load((ROOT / f"configs/{name}.yaml").read_text()) for name in ("ppo", "ppo_fast"))
    changed = {}
    for config, side in ((seed, "seed"), (fast, "fast")):
        changed[side] = (
            config["data"]["init_args"].pop("batch_size"),
            config["model"]["init_args"].pop("minibatch_size"),
            config["model"]["init_args"].pop("learning_rate"),
            config["trainer"]["callbacks"][0]["init_args"].pop("save_every"),
        )
    assert seed == fast
    assert changed == {"seed": (4, 4, 5e-6, 500), "fast": (64, 16, 1e-5, 8)}
