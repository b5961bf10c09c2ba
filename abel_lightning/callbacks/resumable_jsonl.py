"""Resumable per-question output, shared by ``RegimeWCollector`` (rollouts) and ``PlatinumEval`` (evaluation).

For an output file ``P``:

- while the loop runs, each rank appends its records to its own ``P.part<rank>``, one fsynced line per record, as each
  batch ends: a killed run loses at most the batch in flight;
- at the end, after a barrier, rank 0 merges ``P`` and every part file, keeps one record per ``question_id``, orders
  them as the source (by the row in ``"<split>/<row>"``), replaces ``P`` atomically and deletes the parts;
- before the loop, every rank reads ``P`` and all part files (a part's torn last line is ignored) and has the
  datamodule leave those questions out, so rerunning the same command finishes the job.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import lightning as L

from abel_lightning.jsonl import JsonlAppender, read_jsonl, write_jsonl_atomic
from abel_lightning.schemas import Schema

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
