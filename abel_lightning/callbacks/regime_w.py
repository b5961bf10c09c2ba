"""Phase 2: Regime W rollouts. Scores each question's group of sampled solutions and writes one ROLLOUT record per
question, resumably (see :mod:`abel_lightning.callbacks.resumable_jsonl`).

    abel-lightning predict --config configs/rollouts.yaml

Also usable at the end of a PPO ``fit`` (``after_fit: true``): it then samples ``samples_per_question`` solutions per
question of the fit's datamodule from the module's ``policy`` with the module's ``sampling`` settings (one arm).

At the end it prints the per-arm statistics (``bandit.arm_statistics``) and plots them to ``<output stem>_arms.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from rich.console import Console
from rich.table import Table

from abel_lightning.answers import ANSWER_CHECKERS, AnswerChecker
from abel_lightning.bandit import arm_statistics, plot_arm_statistics
from abel_lightning.callbacks.recorder import ResumableRecorder
from abel_lightning.models.generation import Answered
from abel_lightning.regime_w import RegimeWConfig, score_group
from abel_lightning.schemas import ROLLOUT

log = logging.getLogger(__name__)


def rollout_record(answered: Answered, config: RegimeWConfig, checker: AnswerChecker) -> dict:
    """One question's ROLLOUT record: its k trajectories with answers, correctness and rewards, and the group scores."""
    question = answered.question
    texts = [completion.text for completion in answered.completions]
    answers, correct = checker.judge(texts, question["gold_answer"])
    num_tokens = [completion.num_tokens for completion in answered.completions]
    scores, rewards = score_group(texts, answers, num_tokens, correct, config)
    return {
        "question_id": question["question_id"],
        "question": question["question"],
        "prompt": question["prompt"],
        "gold_answer": question["gold_answer"],
        "s_end": scores.s_end,
        "s_path": scores.s_path,
        "s_cf": scores.s_cf,
        "s_wm": scores.s_wm,
        "trajectories": [
            {
                "full_text": text,
                "answer": answer,
                "num_tokens": tokens,
                "reward": reward,
                "correct": right,
                "arm": arm,
                "arm_name": name,
                "temperature": temperature,
            }
            for text, answer, tokens, reward, right, arm, name, temperature in zip(
                texts, answers, num_tokens, rewards, correct, answered.arms, answered.arm_names, answered.temperatures
            )
        ],
    }


class RegimeWCollector(ResumableRecorder):
    """Writes the Regime W rollouts of ``trainer.predict`` (or of the end of ``fit``) to ``output``.

    In ``predict`` the policy module decides k and the arms (``PolicyModule.samples_per_question``, ``arms``); each
    written batch, and on a resume the records already on disk, go to the module's ``observe`` so that a learning
    allocation (``ucb``, ``thompson``) continues from where it was. ``regime_w`` supplies the scoring constants.
    """

    stage = "predict"
    schema = ROLLOUT

    def __init__(
        self,
        output: str = "data/abel_regime_w_rollouts.jsonl",
        regime_w: RegimeWConfig | None = None,
        after_fit: bool = False,
        samples_per_question: int = 8,
        batch_size: int = 4,
        log_every_n_batches: int = 10,
        answer_checker: str | AnswerChecker = "gsm8k",
    ):
        """
        Args:
            output: the rollouts file (JSONL, one question per line, in source order).
            regime_w: Regime W weights and reward constants; None takes the reference defaults.
            after_fit: also collect rollouts when ``fit`` ends, from the trained policy on the fit's questions.
            samples_per_question: k on the ``after_fit`` path (in ``predict`` the policy module's decides).
            batch_size: questions per ``generate`` call on the ``after_fit`` path.
            log_every_n_batches: without a progress bar, log the rates every this many batches (0: never).
            answer_checker: what reads and judges each trajectory's final answer: ``gsm8k`` (the default),
                ``math_verify``, or a class_path to an ``abel_lightning.answers.AnswerChecker``.
        """
        super().__init__(log_every_n_batches)
        self.output = output
        self.checker: AnswerChecker = ANSWER_CHECKERS.resolve(answer_checker)
        self.regime_w = regime_w or RegimeWConfig()
        self.after_fit = after_fit
        self.samples_per_question = samples_per_question
        self.batch_size = batch_size
        self._learner = None

    def output_path(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        return Path(self.output)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # A module with an arm allocation learns from the rollouts; a resumed run first replays those on disk.
        self._learner = getattr(pl_module, "observe", None) if stage == self.stage else None
        if self._learner is not None:
            pl_module.restore_allocation(self.earlier)

    def to_records(self, answered: list[Answered]) -> list[dict]:
        return [rollout_record(a, self.regime_w, self.checker) for a in answered]

    def on_records(self, records: list[dict]) -> None:
        if self._learner is not None:
            self._learner(records)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.after_fit:
            self.record_from_policy(
                trainer,
                pl_module,
                Path(self.output),
                trainer.datamodule.questions,
                pl_module.sampling,
                self.samples_per_question,
                self.batch_size,
            )

    def summarize(self, trainer: L.Trainer, pl_module: L.LightningModule, merged: list[dict] | None, run: dict) -> None:
        if merged is None:
            return
        trajectories = [t for record in merged for t in record["trajectories"]]
        accuracy = sum(t["correct"] for t in trajectories) / len(trajectories) if trajectories else float("nan")
        mean_s_wm = sum(record["s_wm"] for record in merged) / len(merged) if merged else float("nan")
        table = Table(title=f"Regime W rollouts -> {self.output}", show_header=False)
        table.add_column(justify="left")
        table.add_column(justify="right")
        table.add_row("questions in the file", str(len(merged)))
        table.add_row("questions this run", str(run["questions"]))
        table.add_row("trajectory accuracy", f"{accuracy:.4f} ({len(trajectories)} trajectories)")
        table.add_row("mean s_wm", f"{mean_s_wm:.4f}")
        table.add_row("questions/s (this run)", f"{run['questions_per_s']:.2f}")
        table.add_row("tokens/s (this run)", f"{run['tokens_per_s']:.0f}")
        Console().print(table)
        stats = arm_statistics(merged)
        if not stats:
            return
        arms = Table(title="Regime W arms (the whole file)")
        for column in ("arm", "temperature", "samples", "accuracy", "mean reward", "mean tokens", "majority share"):
            arms.add_column(column, justify="left" if column == "arm" else "right")
        for row in stats:
            temperature = "" if row["temperature"] is None else f"{row['temperature']:g}"
            arms.add_row(
                f"{row['arm']} {row['name']}",
                temperature,
                str(row["samples"]),
                f"{row['accuracy']:.4f}",
                f"{row['mean_reward']:.4f}",
                f"{row['mean_tokens']:.1f}",
                f"{row['majority_share']:.4f}",
            )
        Console().print(arms)
        plot_arm_statistics(stats, self.arms_plot)

    @property
    def arms_plot(self) -> Path:
        """Where the per-arm plot goes: ``<output stem>_arms.png`` beside the rollouts file."""
        output = Path(self.output)
        return output.with_name(f"{output.stem}_arms.png")
