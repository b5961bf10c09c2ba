"""The five phases chained from one config, resumable: ``abel-lightning pipeline --config configs/pipeline.yaml``.

Each phase is the same ``abel-lightning`` command a user would run by hand, with its own Lightning config, plus a
small override file (written into ``run_dir/configs/``) that wires the phases together: where the PPO adapter goes,
where rollouts, pairs and evaluations are written. A phase whose outputs are complete is skipped (``run_dir/state.json``
records the finished ones); a phase that was killed resumes where it stopped: training from its ``last.ckpt``,
rollouts and evaluation from the questions already written.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from abel_lightning.callbacks.adapter_checkpoint import LAST

log = logging.getLogger(__name__)

# The embedded default's phase configs ship inside the package (a checkout's configs/tiny links here), so that
# `abel-lightning pipeline` with no arguments runs from any folder, the package installed or not.
TINY_CONFIGS = Path(__file__).resolve().parent / "configs" / "tiny"


@dataclass
class PipelineConfig:
    """What ``configs/pipeline.yaml`` holds. The defaults run the embedded toy testbed (``configs/tiny/``, shipped as
    ``abel_lightning/configs/tiny/``) with the seed's coherence threshold; ``abel-lightning pipeline`` with no arguments
    runs ``configs/tiny/pipeline.yaml``, which sets the toy's. ``run_dir`` is relative to the working folder."""

    run_dir: str = "runs/tiny"
    ppo: str = str(TINY_CONFIGS / "ppo.yaml")
    rollouts: str = str(TINY_CONFIGS / "rollouts.yaml")
    dpo: str = str(TINY_CONFIGS / "dpo.yaml")
    eval: str = str(TINY_CONFIGS / "eval.yaml")
    preference_threshold: float = 0.01
    # Set for the toy testbed: a generated toy dataset (GSM8K format) replaces the phase configs' datasets.
    toy_data: dict | None = field(default_factory=lambda: {"n_train": 2000, "n_test": 200, "seed": 0})
    # Extra `abel-lightning` arguments per phase (ppo, rollouts, dpo, eval), e.g. a strategy file.
    extra_args: dict[str, list[str]] = field(default_factory=dict)


class Run:
    """The paths of one pipeline run and the record of its finished phases."""

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.root = Path(config.run_dir)
        self.ppo_adapter = self.root / "checkpoints" / "ppo_lora"
        self.dpo_adapter = self.root / "checkpoints" / "dpo_lora"
        self.rollouts = self.root / "data" / "rollouts.jsonl"
        self.pairs = self.root / "data" / "preferences.jsonl"
        self.eval_dir = self.root / "eval"
        self.logs = self.root / "logs"
        self.toy_dir = self.root / "data" / "toy"
        self.state_path = self.root / "state.json"

    def finished(self) -> list[str]:
        return json.loads(self.state_path.read_text())["finished"] if self.state_path.exists() else []

    def mark_finished(self, phase: str) -> None:
        state = {"finished": [*self.finished(), phase]}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.state_path)

    def override(self, name: str, values: dict) -> str:
        path = self.root / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        return str(path)


def _callback(class_path: str, **init_args) -> dict:
    return {"class_path": class_path, "init_args": init_args}


def _logger(run: Run, name: str) -> dict:
    return _callback("lightning.pytorch.loggers.CSVLogger", save_dir=str(run.logs), name=name, version=0)


def _training_trainer(run: Run, name: str, adapter: Path, config_path: str) -> dict:
    """A training phase's trainer override: its CSV logs under the run, its adapter saved to ``adapter`` at the phase
    config's own checkpoint interval."""
    checkpoint = _callback(
        "abel_lightning.callbacks.adapter_checkpoint.AdapterCheckpoint",
        dirpath=str(adapter),
        save_every=_save_every(config_path),
    )
    return {"logger": _logger(run, name), "callbacks": [checkpoint]}


def _data_override(run: Run, split: str) -> dict:
    return {"data": {"init_args": {"dataset": str(run.toy_dir), "split": split}}} if run.config.toy_data else {}


def _merge(*parts: dict) -> dict:
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = _merge(merged[key], value)
            else:
                merged[key] = value
    return merged


def phases(run: Run) -> list[tuple[str, list[str] | None]]:
    """Each phase as the ``abel-lightning`` arguments that run it (None for Phase 3, which is no Lightning loop)."""
    cfg = run.config
    resume = lambda adapter: ["--ckpt_path", str(adapter / LAST)] if (adapter / LAST).exists() else []  # noqa: E731

    ppo = _merge({"trainer": _training_trainer(run, "ppo", run.ppo_adapter, cfg.ppo)}, _data_override(run, "train"))
    rollouts = _merge(
        {
            "model": {"init_args": {"adapter": str(run.ppo_adapter)}},
            "trainer": {"callbacks": [_rollout_callback(cfg.rollouts, run.rollouts)]},
        },
        _data_override(run, "train"),
    )
    dpo = {
        "model": {"init_args": {"adapter": str(run.ppo_adapter)}},
        "data": {"init_args": {"pairs": str(run.pairs), "rollouts": str(run.rollouts)}},
        "trainer": _training_trainer(run, "dpo", run.dpo_adapter, cfg.dpo),
    }
    evaluation = lambda adapter: _merge(  # noqa: E731
        {
            "model": {"init_args": {"adapter": adapter}},
            "trainer": {
                "callbacks": [
                    _callback("abel_lightning.callbacks.platinum_eval.PlatinumEval", output_dir=str(run.eval_dir))
                ]
            },
        },
        _data_override(run, "test"),
    )
    extra = lambda name: list(cfg.extra_args.get(name, []))  # noqa: E731

    def command(subcommand: str, config: str, name: str, override: dict, extra_key: str, *tail: str) -> list[str]:
        """The phase's arguments: its config, then the run's override of it, then the user's extra arguments."""
        return [subcommand, "--config", config, "--config", run.override(name, override), *extra(extra_key), *tail]

    return [
        ("ppo", command("fit", cfg.ppo, "ppo", ppo, "ppo", *resume(run.ppo_adapter))),
        ("rollouts", command("predict", cfg.rollouts, "rollouts", rollouts, "rollouts")),
        ("preferences", None),
        ("dpo", command("fit", cfg.dpo, "dpo", dpo, "dpo", *resume(run.dpo_adapter))),
        ("eval_base", command("test", cfg.eval, "eval_base", evaluation(None), "eval")),
        ("eval_ppo", command("test", cfg.eval, "eval_ppo", evaluation(str(run.ppo_adapter)), "eval")),
        ("eval_dpo", command("test", cfg.eval, "eval_dpo", evaluation(str(run.dpo_adapter)), "eval")),
    ]


def _phase_config(path: str) -> dict:
    return yaml.safe_load(Path(path).read_text()) or {}


def _save_every(config_path: str) -> int:
    """Keep the phase config's own checkpoint interval, if it sets one."""
    for callback in _phase_config(config_path).get("trainer", {}).get("callbacks", []) or []:
        if callback.get("class_path", "").endswith("AdapterCheckpoint"):
            return int(callback.get("init_args", {}).get("save_every", 500))
    return 500


def _rollout_callback(config_path: str, output: Path) -> dict:
    """The rollouts config's collector, with its Regime W settings kept and its output moved into the run."""
    for callback in _phase_config(config_path).get("trainer", {}).get("callbacks", []) or []:
        if callback.get("class_path", "").endswith("RegimeWCollector"):
            return _merge(callback, {"init_args": {"output": str(output)}})
    return _callback("abel_lightning.callbacks.regime_w.RegimeWCollector", output=str(output))


def run_pipeline(config: PipelineConfig, run_phase: Callable[[list[str]], object]) -> Path:
    """Run (or resume) every phase, then write ``report.md``; returns the report's path.

    ``run_phase`` runs one Lightning phase from its ``abel-lightning`` arguments (the CLI passes its own, so this
    module needs nothing of the command's).
    """
    from abel_lightning.preferences import write_preferences
    from abel_lightning.report import write_report

    run = Run(config)
    run.root.mkdir(parents=True, exist_ok=True)
    if run.config.toy_data is not None and not (run.toy_dir / "test.jsonl").exists():
        from abel_lightning.data.toy import write_toy_dataset

        write_toy_dataset(run.toy_dir, **run.config.toy_data)
    for name, args in phases(run):
        if name in run.finished():
            log.info("pipeline: %s is complete, skipping it", name)
            continue
        log.info("pipeline: running %s", name)
        if args is None:
            write_preferences(run.rollouts, run.pairs, run.config.preference_threshold)
        else:
            run_phase(args)
        run.mark_finished(name)
    return write_report(run)
