"""Resumable per-question output, shared by ``RegimeWCollector`` (rollouts) and ``PlatinumEval`` (evaluation).

For an output file ``P``:

- while the loop runs, each rank appends its records to its own ``P.part<rank>``, one fsynced line per record, as each
  batch ends: a killed run loses at most the batch in flight;
- at the end, after a barrier, rank 0 merges ``P`` and every part file, keeps one record per ``question_id``, orders
  them as the source (by the row in ``"<split>/<row>"``), replaces ``P`` atomically and deletes the parts;
- before the loop, every rank reads ``P`` and all part files (a part's torn last line is ignored) and has the
  datamodule leave those questions out, so rerunning the same command finishes the job.

The end-of-run work runs in the callback's ``teardown``, which Lightning calls on every rank once the stage is over,
even on a rank whose share of the questions was empty (that rank skips the loop and all of its hooks). It is not
called when the run raised, so a crash never merges and a half-finished ``P`` is never mistaken for a finished one.
"""

from __future__ import annotations

import glob
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch

from abel_lightning.compat import show_on_progress_bar
from abel_lightning.data.gsm8k import FILLER_ID, shard_questions
from abel_lightning.jsonl import JsonlAppender, read_jsonl, write_jsonl_atomic
from abel_lightning.models.generation import Answered, SamplingSettings, generate
from abel_lightning.distributed import weights_sharded
from abel_lightning.schemas import Schema

log = logging.getLogger(__name__)

_PART_SUFFIX_RE = re.compile(r"\.part(\d+)$")


def source_row(question_id: str) -> int:
    """The 0-based source row of a ``"<split>/<row>"`` question id: ``"train/42"`` -> 42."""
    _, slash, row = question_id.rpartition("/")
    if not slash or not row.isdigit():
        raise ValueError(f"question_id {question_id!r} is not '<split>/<row>' (as GSM8KDataModule numbers questions)")
    return int(row)


class ResumableJsonl:
    """One output file written by all ranks through per-rank part files (see the module docstring)."""

    def __init__(self, path: str | Path, schema: Schema, rank: int = 0) -> None:
        self.path = Path(path)
        self.schema = schema
        self.rank = rank
        self._appender: JsonlAppender | None = None

    @property
    def part_path(self) -> Path:
        return self.path.with_name(f"{self.path.name}.part{self.rank}")

    def part_paths(self) -> list[Path]:
        """Every rank's part file, including those of an earlier run with more ranks, in rank order."""
        if not self.path.parent.exists():
            return []
        candidates = self.path.parent.glob(f"{glob.escape(self.path.name)}.part*")
        parts = [p for p in candidates if _PART_SUFFIX_RE.search(p.name)]
        return sorted(parts, key=lambda p: int(_PART_SUFFIX_RE.search(p.name).group(1)))

    def read(self) -> list[dict]:
        """The records already on disk, one per question (first seen wins), in source order."""
        records = read_jsonl(self.path, self.schema) if self.path.exists() else []
        for part in self.part_paths():
            records.extend(read_jsonl(part, self.schema, tolerate_partial_tail=True))
        unique: dict[str, dict] = {}
        for record in records:
            unique.setdefault(record["question_id"], record)
        return sorted(unique.values(), key=lambda record: source_row(record["question_id"]))

    def append(self, records: list[dict]) -> None:
        if self._appender is None:
            self._appender = JsonlAppender(self.part_path, self.schema)
        for record in records:
            self._appender.append(record)

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()
            self._appender = None

    def merge(self) -> list[dict]:
        """Replace ``P`` with everything in ``P`` and the parts, then delete the parts; returns the merged records.

        Only one process may call this, after all writers have closed their parts.
        """
        parts = self.part_paths()
        records = self.read()
        if records or self.path.exists():
            write_jsonl_atomic(self.path, records, self.schema)
        for part in parts:
            part.unlink()
        return records

    def finish(self, trainer: L.Trainer) -> list[dict] | None:
        """Close this rank's part, wait for all ranks, merge on rank 0 (its records are returned; None elsewhere)."""
        self.close()
        trainer.strategy.barrier("resumable_jsonl_written")
        merged = self.merge() if trainer.is_global_zero else None
        # Nobody leaves before P is final: a next stage on another rank may read it at once.
        trainer.strategy.barrier("resumable_jsonl_merged")
        return merged


class ResumableRecorder(L.Callback):
    """Base of the callbacks that turn a policy's answers into one JSONL record per question, resumably.

    A subclass sets ``stage`` (``"predict"`` or ``"test"``) and ``schema``, and implements :meth:`output_path`,
    :meth:`to_records` and :meth:`summarize`; it may use :meth:`on_records` to accumulate metrics. Outside its stage's
    loop (inside ``fit``) a subclass drives the same machinery with :meth:`start`, :meth:`record`, :meth:`finish` and
    :func:`answer_with_policy`.
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
        """Write one batch's records to this rank's part file and update the progress display."""
        if self.writer is None:
            raise RuntimeError(f"{type(self).__name__}.record called before start(): no output file is open")
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

    def _show_progress(self, trainer: L.Trainer) -> None:
        """This rank's rates, on Lightning's progress bar when there is one, else in a log line every few batches."""
        seconds = max(time.perf_counter() - (self._started or time.perf_counter()), 1e-9)
        rates = f"{self._questions / seconds:.2f} questions/s, {self._tokens / seconds:.0f} tokens/s"
        if show_on_progress_bar(trainer, self.stage, rates):
            return
        if trainer.is_global_zero and self.log_every_n_batches > 0 and self._batches % self.log_every_n_batches == 0:
            log.info("%s: %d questions this run, %s (rank 0)", self.writer.path, self._questions, rates)


def answer_with_policy(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    questions: list[dict],
    sampling: SamplingSettings,
    samples_per_question: int,
    batch_size: int,
) -> Iterator[list[Answered]]:
    """Sample from a training module's ``policy``/``tokenizer`` on this rank's share of ``questions``, batch by batch.

    For sampling inside ``fit`` (after PPO, or evaluating every N steps), where no predict/test loop serves the
    questions. Rank r takes ``questions[r::world_size]``. Under FSDP the decoding is synchronized across ranks, so a
    share shorter than the largest is topped up with the filler question, whose answers are dropped: every rank then
    makes the same ``generate`` calls. The policy is put in eval mode (no dropout) and returned to its previous mode
    afterwards.
    """
    sharded = weights_sharded(trainer)
    served, shard = shard_questions(questions, trainer.world_size, trainer.global_rank, even=sharded)
    share = [served[i] for i in shard]
    policy = pl_module.policy
    was_training = policy.training
    policy.eval()
    try:
        for start in range(0, len(share), batch_size):
            chunk = share[start : start + batch_size]
            groups = generate(policy, pl_module.tokenizer, [q["prompt"] for q in chunk], sampling, samples_per_question,
                              synced_gpus=sharded)
            answered = [Answered(q, g, [0] * samples_per_question) for q, g in zip(chunk, groups)
                        if q["question_id"] != FILLER_ID]
            if answered:
                yield answered
    finally:
        policy.train(was_training)
