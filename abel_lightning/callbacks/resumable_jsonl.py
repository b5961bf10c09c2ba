"""Resumable per-question output, shared by ``RegimeWCollector`` (rollouts) and ``PlatinumEval`` (evaluation).

For an output file ``P``:

- while the loop runs, each rank appends its records to a part file of its own, ``P.part<n>``, one fsynced line per
  record, as each batch ends: a killed run loses at most the batch in flight;
- at the end, after a barrier, rank 0 merges ``P`` and every part file, keeps one record per ``question_id``, orders
  them as the source (by the row in ``"<split>/<row>"``), replaces ``P`` atomically and deletes the parts;
- before the loop, every rank reads ``P`` and all part files (a part's torn last line is ignored) and has the
  datamodule leave those questions out, so rerunning the same command finishes the job.

Two runs started on the same ``P`` (a command launched twice) must not corrupt each other, so part files are owned
through ``flock``: a writer holds an exclusive lock on its part while it is open, and takes ``P.part<rank>`` or, if a
live process holds that one, the next free number. A merge runs under a lock on the folder, merges every part but
deletes only those no live writer holds; the run still writing merges its own part when it ends. A lock dies with its
process, so a killed run's part is free for the rerun. On a file system without ``flock`` (Lustre mounted without
it, some NFS) one warning says so and a single run per output works as before.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import glob
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L

from abel_lightning.jsonl import JsonlAppender, read_jsonl, write_jsonl_atomic
from abel_lightning.schemas import Schema

_PART_SUFFIX_RE = re.compile(r"\.part(\d+)$")
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}

log = logging.getLogger(__name__)


def source_row(question_id: str) -> int:
    """The 0-based source row of a ``"<split>/<row>"`` question id: ``"train/42"`` -> 42."""
    _, slash, row = question_id.rpartition("/")
    if not slash or not row.isdigit():
        raise ValueError(f"question_id {question_id!r} is not '<split>/<row>' (as GSM8KDataModule numbers questions)")
    return int(row)


def _flock(fd: int, operation: int) -> bool:
    """Lock ``fd``; False when another process holds it (``LOCK_NB``). Where the file system has no locks, True."""
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno not in _NO_LOCKS:
            raise
        _warn_no_locks(os.strerror(error.errno))
    return True


@functools.cache
def _warn_no_locks(reason: str) -> None:
    log.warning("this file system has no file locks (%s): run one command per output file at a time", reason)


def _lock_part(path: Path, create: bool) -> int | None:
    """An open descriptor holding ``path``'s exclusive lock, or None when a live process holds it."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
    if _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
        return fd
    os.close(fd)
    return None


@contextmanager
def _merging(folder: Path) -> Iterator[None]:
    """One merge at a time in ``folder``, across processes: two would delete each other's parts mid-read."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        _flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class ResumableJsonl:
    """One output file written by all ranks through per-rank part files (see the module docstring)."""

    def __init__(self, path: str | Path, schema: Schema, rank: int = 0) -> None:
        self.path = Path(path)
        self.schema = schema
        self.rank = rank
        self._appender: JsonlAppender | None = None
        self._part_lock: int | None = None

    def _part(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.part{number}")

    def _claim_part(self) -> Path:
        """Lock and return the first part file from ``P.part<rank>`` on that no live process is writing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        number = self.rank
        while True:
            part = self._part(number)
            fd = _lock_part(part, create=True)
            if fd is None:
                number += 1
                continue
            # A merge may have deleted the file between our open and our lock; then the lock guards nothing.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(part))
            except FileNotFoundError:
                current = False
            if current:
                self._part_lock = fd
                return part
            os.close(fd)

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
            self._appender = JsonlAppender(self._claim_part(), self.schema)
        for record in records:
            self._appender.append(record)

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()
            self._appender = None
        if self._part_lock is not None:
            os.close(self._part_lock)
            self._part_lock = None

    def merge(self) -> list[dict]:
        """Replace ``P`` with everything in ``P`` and the parts, then delete the parts; returns the merged records.

        A part another live process is still writing is merged as far as it goes but kept: its writer merges it when it
        ends. Within a run, call this on one rank after every rank has closed its part (``finish`` does).
        """
        if not self.path.parent.exists():
            return []
        with _merging(self.path.parent):
            finished = {}
            try:
                for part in self.part_paths():
                    fd = _lock_part(part, create=False)
                    if fd is not None:
                        finished[part] = fd
                records = self.read()
                if records or self.path.exists():
                    write_jsonl_atomic(self.path, records, self.schema)
                for part in finished:
                    part.unlink()
            finally:
                for fd in finished.values():
                    os.close(fd)
        return records

    def finish(self, trainer: L.Trainer) -> list[dict] | None:
        """Close this rank's part, wait for all ranks, merge on rank 0 (its records are returned; None elsewhere)."""
        self.close()
        trainer.strategy.barrier("resumable_jsonl_written")
        merged = self.merge() if trainer.is_global_zero else None
        # Nobody leaves before P is final: a next stage on another rank may read it at once.
        trainer.strategy.barrier("resumable_jsonl_merged")
        return merged
