"""Phase 2: Regime W rollouts. Scores each question's group of sampled solutions and writes one ROLLOUT record per
question, resumably (see :mod:`abel_lightning.callbacks.resumable_writer`).

    abel-lightning predict --config configs/rollouts.yaml

Also usable at the end of a PPO ``fit`` (``after_fit: true``): it then samples ``regime_w.k`` solutions per question of
the fit's datamodule from the module's ``policy`` with the module's ``sampling`` settings.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from rich.console import Console
from rich.table import Table

from abel_lightning.answers import extract_answer, is_correct
from abel_lightning.callbacks.resumable_writer import ResumableRecorder, answer_with_policy
from abel_lightning.models.generation import Answered, SamplingSettings
from abel_lightning.regime_w import RegimeWConfig, score_group
from abel_lightning.schemas import ROLLOUT

log = logging.getLogger(__name__)


def rollout_record(answered: Answered, config: RegimeWConfig) -> dict:
    """One question's ROLLOUT record: its k trajectories with answers, correctness and rewards, and the group scores."""
    question = answered.question
    texts = [completion.text for completion in answered.completions]
    answers = [extract_answer(text) for text in texts]
    correct = [is_correct(answer, question["gold_answer"]) for answer in answers]
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
            {"full_text": text, "answer": answer, "num_tokens": tokens, "reward": reward, "correct": right, "arm": arm}
            for text, answer, tokens, reward, right, arm in zip(
                texts, answers, num_tokens, rewards, correct, answered.arms
            )
        ],
    }


class RegimeWCollector(ResumableRecorder):
    """Writes the Regime W rollouts of ``trainer.predict`` (or of the end of ``fit``) to ``output``.

    In ``predict`` the policy module decides k (``samples_per_question``, or one per arm); ``regime_w`` supplies the
    scoring constants, and its ``k`` is the sample count of the ``after_fit`` path.
    """

    stage = "predict"
    schema = ROLLOUT

    def __init__(
        self,
        output: str = "data/abel_regime_w_rollouts.jsonl",
        regime_w: RegimeWConfig | None = None,
        after_fit: bool = False,
        batch_size: int = 4,
        log_every_n_batches: int = 10,
    ):
        """
        Args:
            output: the rollouts file (JSONL, one question per line, in source order).
            regime_w: Regime W weights and reward constants; None takes the reference defaults.
            after_fit: also collect rollouts when ``fit`` ends, from the trained policy on the fit's questions.
            batch_size: questions per ``generate`` call on the ``after_fit`` path.
            log_every_n_batches: without a progress bar, log the rates every this many batches (0: never).
        """
        super().__init__(log_every_n_batches)
        self.output = output
        self.regime_w = regime_w or RegimeWConfig()
        self.after_fit = after_fit
        self.batch_size = batch_size
        self._warned_k = False

    def output_path(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        return Path(self.output)

    def to_records(self, answered: list[Answered]) -> list[dict]:
        if not self._warned_k and any(len(a.completions) != self.regime_w.k for a in answered):
            rank_zero_warn(
                f"the policy sampled {len(answered[0].completions)} solutions per question but regime_w.k is "
                f"{self.regime_w.k}; the groups are scored as sampled (set model.samples_per_question to match)"
            )
            self._warned_k = True
        return [rollout_record(a, self.regime_w) for a in answered]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.after_fit:
            return
        self.start(trainer, Path(self.output))
        done = {record["question_id"] for record in self.earlier}
        pending = [q for q in trainer.datamodule.questions if q["question_id"] not in done]
        sampling: SamplingSettings = pl_module.sampling
        for answered in answer_with_policy(trainer, pl_module, pending, sampling, self.regime_w.k, self.batch_size):
            self.record(trainer, answered)
        self.finish(trainer, pl_module)

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
