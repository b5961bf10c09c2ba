"""The project's one JSONL reader and writer, with schema validation and crash-safe writes.

Every phase hands its results to the next as JSON Lines: UTF-8, one object per line, each line ending in ``\\n``.
Readers check records against a schema from :mod:`abel_lightning.schemas` and name the file, line and field of the
first problem. Writers either append one fsynced line at a time (:class:`JsonlAppender`, for resumable phases) or
replace a whole file at once (:func:`write_jsonl_atomic`), so an interrupted run never leaves a half-written record
that a later run would trust.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Hashable, Iterable, Iterator
from pathlib import Path
from types import TracebackType

from abel_lightning.errors import ActionableError
from abel_lightning.schemas import FieldType, Schema

logger = logging.getLogger(__name__)

_REPR_LIMIT = 80
_TAIL_CHUNK = 1 << 16


class _Missing:
    """Stands for an absent field in error messages."""

    def __repr__(self) -> str:
        return "nothing (the field is missing)"


_MISSING = _Missing()


class SchemaError(ValueError):
    """A record does not match its schema; ``field`` is a dotted path such as ``trajectories[3].reward``, or None
    when the record itself is not an object. Readers and writers turn it into a :class:`JsonlError`."""

    def __init__(self, field: str | None, expected: str, got: object) -> None:
        self.field = field
        self.expected = expected
        self.got = got
        where = f"field '{field}': " if field is not None else ""
        super().__init__(f"{where}expected {expected}, got {_short_repr(got)}")


class JsonlError(ActionableError, ValueError):
    """A bad line in a JSONL file, located by ``path``, 1-based ``line`` and ``field`` (None when the line is not
    valid JSON or not an object).

    ``JsonlError("rollouts.jsonl", 3, "trajectories[1].reward", "float", "high")`` reads
    ``rollouts.jsonl:3: field 'trajectories[1].reward': expected float, got 'high'. Fix or remove this line.``
    """

    def __init__(
        self,
        path: str | os.PathLike,
        line: int,
        field: str | None,
        expected: str | None = None,
        got: object = None,
        *,
        reason: str | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        if reason is not None:
            message = f"{path}:{line}: not valid JSON ({reason}). Fix or remove this line."
        elif field is None:
            message = f"{path}:{line}: expected {expected}, got {_short_repr(got)}. Fix or remove this line."
        else:
            message = (
                f"{path}:{line}: field '{field}': expected {expected}, got {_short_repr(got)}. Fix or remove this line."
            )
        super().__init__(message)


class EmptyJsonlError(ActionableError, ValueError):
    """A JSONL file with no records (empty, or blank lines only) where a phase needs some; ``what_to_do`` says how
    to get them."""

    def __init__(self, path: str | os.PathLike, what_to_do: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: no records (the file is empty or holds only blank lines); {what_to_do}")


def validate(record: object, schema: Schema) -> None:
    """Check ``record`` against ``schema`` (see :mod:`abel_lightning.schemas`); raise :class:`SchemaError` at the
    first mismatch. Extra fields are allowed.

    Example: ``validate({"num_tokens": True}, {"num_tokens": int})`` raises
    ``SchemaError("field 'num_tokens': expected int, got True")``.
    """
    if not isinstance(record, dict):
        raise SchemaError(None, "a JSON object", record)
    _validate_fields(record, schema, prefix="")


def iter_jsonl(
    path: str | os.PathLike, schema: Schema | None = None, tolerate_partial_tail: bool = False
) -> Iterator[dict]:
    """Yield the records of a JSONL file in order (see :func:`iter_numbered_jsonl`)."""
    for _, record in iter_numbered_jsonl(path, schema, tolerate_partial_tail):
        yield record


def iter_numbered_jsonl(
    path: str | os.PathLike, schema: Schema | None = None, tolerate_partial_tail: bool = False
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for the records of a JSONL file in order (1-based line numbers, so callers
    that check more than the schema can name the line), skipping blank lines; with ``schema``, validate each one.

    ``tolerate_partial_tail=True`` (for resuming) ignores a last line that has no trailing newline, the mark of a
    writer killed mid-line, instead of reading it (and failing on its truncated JSON).
    Raises :class:`JsonlError` naming ``path:line`` and the field.
    """
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, start=1):
            if tolerate_partial_tail and not raw.endswith(b"\n"):
                if raw.strip():
                    logger.warning(
                        "%s:%d: ignoring the incomplete last line (no trailing newline: its writer was interrupted)",
                        path,
                        line_number,
                    )
                return
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                reason = f"not UTF-8: {error.reason} at byte {error.start}"
                raise JsonlError(path, line_number, None, reason=reason) from error
            if not text.strip():
                continue
            overflowed: list[str] = []
            try:
                record = json.loads(text, parse_constant=_reject_constant, parse_float=_float_noting(overflowed))
            except ValueError as error:
                # JSONDecodeError locates the problem; other ValueErrors come from _reject_constant (NaN, Infinity).
                reason = (
                    f"{error.msg} at column {error.colno}" if isinstance(error, json.JSONDecodeError) else str(error)
                )
                raise JsonlError(path, line_number, None, reason=reason) from error
            if overflowed:
                expected = "a number within float range (about ±1.8e308)"
                raise JsonlError(path, line_number, _first_non_finite(record), expected, overflowed[0])
            if schema is not None:
                _validate_line(record, schema, path, line_number)
            yield line_number, record


def read_jsonl(
    path: str | os.PathLike, schema: Schema | None = None, tolerate_partial_tail: bool = False
) -> list[dict]:
    """All records of a JSONL file (see :func:`iter_jsonl`)."""
    return list(iter_jsonl(path, schema, tolerate_partial_tail))


class JsonlAppender:
    """Appends records to a JSONL file one fsynced line at a time, so a killed process loses at most the record it
    was writing.

    On opening, an incomplete last line left by such a kill (no trailing newline) is truncated away with a warning, so
    the next record starts on a line of its own. With ``schema``, each record is validated before it is written.

    >>> with JsonlAppender("outputs/rollouts.jsonl", ROLLOUT) as out:  # doctest: +SKIP
    ...     out.append(record)
    """

    def __init__(self, path: str | os.PathLike, schema: Schema | None = None) -> None:
        self.path = Path(path)
        self.schema = schema
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_tail(self.path)
        self._file = open(self.path, "ab")
        # Only for error messages: the line number a rejected record would have had.
        self._lines = _count_lines(self.path)

    def append(self, record: dict) -> None:
        """Write ``record`` as one line, then flush and fsync it to disk."""
        if self.schema is not None:
            _validate_line(record, self.schema, self.path, self._lines + 1)
        self._file.write(_encode(record))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._lines += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict], schema: Schema | None = None) -> int:
    """Write ``records`` to ``path`` all at once and return how many were written.

    The records go to a temporary file in the same folder, which then replaces ``path`` in one ``os.replace``; if the
    iterator, validation or serialization fails midway, the temporary file is removed and ``path`` is left as it was
    (absent, or the previous complete version). Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are private (0600) and would keep that mode after the rename.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    count = 0
    try:
        with open(temporary, "xb") as file:
            for count, record in enumerate(records, start=1):
                if schema is not None:
                    _validate_line(record, schema, path, count)
                file.write(_encode(record))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return count


def _validate_line(record: object, schema: Schema, path: str | os.PathLike, line: int) -> None:
    try:
        validate(record, schema)
    except SchemaError as error:
        raise JsonlError(path, line, error.field, error.expected, error.got) from error


def _validate_fields(record: dict, schema: Schema, prefix: str) -> None:
    for name, field_type in schema.items():
        field = f"{prefix}{name}"
        if name not in record:
            raise SchemaError(field, _describe(field_type), _MISSING)
        value = record[name]
        if isinstance(field_type, list):
            (item_schema,) = field_type
            if not isinstance(value, list):
                raise SchemaError(field, _describe(field_type), value)
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    raise SchemaError(f"{field}[{index}]", "a JSON object", item)
                _validate_fields(item, item_schema, prefix=f"{field}[{index}].")
        elif isinstance(field_type, frozenset):
            if not isinstance(value, Hashable) or isinstance(value, bool) or value not in field_type:
                raise SchemaError(field, _describe(field_type), value)
        elif not _is_instance(value, field_type if isinstance(field_type, tuple) else (field_type,)):
            raise SchemaError(field, _describe(field_type), value)


def _is_instance(value: object, types: tuple[type, ...]) -> bool:
    """isinstance with JSON's number rules: bool is not a number, and an int is a valid float."""
    for expected in types:
        if expected is bool or isinstance(value, bool):
            if expected is bool and isinstance(value, bool):
                return True
        elif expected is float:
            if isinstance(value, (int, float)):
                return True
        elif isinstance(value, expected):
            return True
    return False


def _describe(field_type: FieldType) -> str:
    """``(str, type(None))`` -> ``"str or null"``; ``[TRAJECTORY]`` -> ``"a list of objects"``."""
    if isinstance(field_type, list):
        return "a list of objects"
    if isinstance(field_type, frozenset):
        return "one of " + ", ".join(repr(value) for value in sorted(field_type, key=repr))
    types = field_type if isinstance(field_type, tuple) else (field_type,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _encode(record: dict) -> bytes:
    # allow_nan=False: NaN and Infinity are not JSON; failing here is better than a file other tools cannot read.
    return (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _float_noting(overflowed: list[str]):
    """A ``parse_float`` that appends to ``overflowed`` the text of each number too large for a float: Python reads
    ``1e400`` as infinity, which no JSON writer (ours included) can write back."""

    def parse(text: str) -> float:
        value = float(text)
        if math.isinf(value):
            overflowed.append(text)
        return value

    return parse


def _first_non_finite(record: object) -> str | None:
    """Dotted path (``trajectories[1].reward``) of the first infinite number in ``record``, in document order; None
    when ``record`` is the number itself. Iterative, so that a deeply nested line cannot exhaust the stack."""
    stack: list[tuple[str | None, object]] = [(None, record)]
    while stack:
        field, value = stack.pop()
        if isinstance(value, float) and math.isinf(value):
            return field
        if isinstance(value, dict):
            items = [(key if field is None else f"{field}.{key}", item) for key, item in value.items()]
            stack.extend(reversed(items))
        elif isinstance(value, list):
            stack.extend(reversed([(f"{field or ''}[{index}]", item) for index, item in enumerate(value)]))
    return None


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def _count_lines(path: Path) -> int:
    with open(path, "rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(_TAIL_CHUNK), b""))


def _drop_partial_tail(path: Path) -> None:
    """Truncate a last line that lacks its newline (a write cut short), logging how many bytes were dropped."""
    if not path.exists():
        return
    with open(path, "r+b") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return
        file.seek(size - 1)
        if file.read(1) == b"\n":
            return
        # Search backwards for the last newline; everything after it is the partial line.
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - _TAIL_CHUNK)
            file.seek(start)
            newline = file.read(end - start).rfind(b"\n")
            if newline != -1:
                keep = start + newline + 1
                break
            end = start
        file.truncate(keep)
        file.flush()
        os.fsync(file.fileno())
    logger.warning(
        "%s: dropped an incomplete last line (%d bytes without a trailing newline, left by an interrupted write); "
        "the record it held is lost (a resumed run produces it again)",
        path,
        size - keep,
    )
