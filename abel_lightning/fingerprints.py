"""Content fingerprints of files, for the caches that must notice when their inputs change (the pairs file a DPO run
serves, the adapter its reference log-probs come from)."""

from __future__ import annotations

from pathlib import Path

CHUNK_BYTES = 1 << 20


def update_with_file(digest, path: str | Path) -> None:
    """Feed the bytes of ``path`` to ``digest`` (a ``hashlib`` object), a chunk at a time: a 7B adapter or a large
    pairs file is never held in memory whole."""
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(CHUNK_BYTES), b""):
            digest.update(chunk)
