"""The base of the callbacks that turn a policy's answers into one JSONL record per question, resumably
(:mod:`abel_lightning.callbacks.resumable_jsonl` describes the files).

The end-of-run work runs in the callback's ``teardown``, which Lightning calls on every rank once the stage is over,
even on a rank whose share of the questions was empty (that rank skips the loop and all of its hooks). It is not
called when the run raised, so a crash never merges and a half-finished ``P`` is never mistaken for a finished one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch

from abel_lightning.callbacks.fit_sampling import answer_with_policy
from abel_lightning.callbacks.resumable_jsonl import ResumableJsonl
from abel_lightning.compat import show_on_progress_bar
from abel_lightning.data.gsm8k import FILLER_ID
from abel_lightning.models.generation import Answered, SamplingSettings
from abel_lightning.schemas import Schema

log = logging.getLogger(__name__)


class ResumableRecorder(L.Callback):
    """Base of the callbacks that turn a policy's answers into one JSONL record per question, resumably.

    A subclass sets ``stage`` (``"predict"`` or ``"test"``) and ``schema``, and implements :meth:`output_path`,
    :meth:`to_records` and :meth:`summarize`; it may use :meth:`on_records` to accumulate metrics. Outside its stage's
    loop (inside ``fit``) a subclass calls :meth:`record_from_policy`.
    """

    stage: str
    schema: Schema

    def __init__(self, log_every_n_batches: int = 10) -> None:
        self.log_every_n_batches = log_every_n_batches
        self.writer: ResumableJsonl | None = None
        self.earlier: list[dict] = []
        self._questions = 0
        self._tokens = 0
        self._batches = 0
        self._started: float | None = None

    # -- what a subclass supplies -------------------------------------------------------------------------------------

    def output_path(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        raise NotImplementedError

    def to_records(self, answered: list[Answered]) -> list[dict]:
        raise NotImplementedError

    def on_records(self, records: list[dict]) -> None:
        """Called on every rank with the records of each batch it answered."""

    def summarize(self, trainer: L.Trainer, pl_module: L.LightningModule, merged: list[dict] | None, run: dict) -> None:
        """Called on every rank at the end; ``merged`` is the final file's records on rank 0 (None elsewhere), ``run``
        this run's totals over all ranks: ``questions``, ``tokens``, ``seconds``, ``tokens_per_s``,
        ``questions_per_s``."""

    # -- Lightning hooks ----------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != self.stage:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "skip"):
            raise TypeError(
                f"{type(self).__name__} resumes by leaving answered questions out of the datamodule: pass a datamodule "
                f"with skip(question_ids), such as GSM8KDataModule, to trainer.{stage}(...)"
            )
        self.start(trainer, self.output_path(trainer, pl_module))
        datamodule.skip({record["question_id"] for record in self.earlier})
        if self.earlier and trainer.is_global_zero:
            log.info("%s: resuming, %d questions already answered", self.writer.path, len(self.earlier))

    # The hooks of both loops are defined here; each callback acts only in its own stage's loop.

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stage == "predict":
            self._started = time.perf_counter()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stage == "test":
            self._started = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.stage == "predict":
            self.record(trainer, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.stage == "test":
            self.record(trainer, outputs)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == self.stage and self.writer is not None:
            self.finish(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # The part files stay as they are for the rerun; only the open handle goes.
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # -- the machinery ------------------------------------------------------------------------------------------------

    def start(self, trainer: L.Trainer, path: Path) -> None:
        """Open ``path`` for this rank and read what earlier runs left there into ``self.earlier``."""
        self.writer = ResumableJsonl(path, self.schema, trainer.global_rank)
        self.earlier = self.writer.read()
        self._questions = self._tokens = self._batches = 0
        self._started = time.perf_counter()

    def record(self, trainer: L.Trainer, answered: list[Answered]) -> None:
        """Write one batch's records to this rank's part file and update the progress display.

        The filler question (which tops up a rank's share under FSDP, see ``data.gsm8k.FILLER_ID``) is dropped here,
        the one place for every loop."""
        if self.writer is None:
            raise RuntimeError(f"{type(self).__name__}.record called before start(): no output file is open")
        answered = [a for a in answered if a.question["question_id"] != FILLER_ID]
        if not answered:
            return
        records = self.to_records(answered)
        self.writer.append(records)
        self.on_records(records)
        self._questions += len(answered)
        self._tokens += sum(len(c.response_ids) for a in answered for c in a.completions)
        self._batches += 1
        self._show_progress(trainer)

    def finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Merge the parts into the output file (all ranks must call this) and summarize."""
        seconds = time.perf_counter() - (self._started or time.perf_counter())
        merged = self.writer.finish(trainer)
        totals = torch.tensor([self._questions, self._tokens], dtype=torch.float64, device=trainer.strategy.root_device)
        questions, tokens = trainer.strategy.reduce(totals, reduce_op="sum").tolist()
        run = {
            "questions": int(questions),
            "tokens": int(tokens),
            "seconds": seconds,
            "questions_per_s": questions / seconds if seconds > 0 else 0.0,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        }
        self.summarize(trainer, pl_module, merged, run)
        self.writer = None

    def record_from_policy(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        path: Path,
        questions: list[dict],
        sampling: SamplingSettings,
        samples_per_question: int,
        batch_size: int,
    ) -> None:
        """Inside ``fit``: answer the questions of ``questions`` not yet in ``path`` with the training module's policy
        (:func:`answer_with_policy`), record them and finish the file, on every rank."""
        self.start(trainer, path)
        done = {record["question_id"] for record in self.earlier}
        pending = [q for q in questions if q["question_id"] not in done]
        for answered in answer_with_policy(trainer, pl_module, pending, sampling, samples_per_question, batch_size):
            self.record(trainer, answered)
        self.finish(trainer, pl_module)

    def _show_progress(self, trainer: L.Trainer) -> None:
        """This rank's rates, on Lightning's progress bar when there is one, else in a log line every few batches."""
        seconds = max(time.perf_counter() - (self._started or time.perf_counter()), 1e-9)
        rates = f"{self._questions / seconds:.2f} questions/s, {self._tokens / seconds:.0f} tokens/s"
        if show_on_progress_bar(trainer, self.stage, rates):
            return
        if trainer.is_global_zero and self.log_every_n_batches > 0 and self._batches % self.log_every_n_batches == 0:
            log.info("%s: %d questions this run, %s (rank 0)", self.writer.path, self._questions, rates)
