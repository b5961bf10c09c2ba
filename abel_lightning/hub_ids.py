"""Telling a local path from a Hugging Face hub id, so that a local path that does not exist is reported as missing
instead of being sent to the hub, whose id validator answers a typo with a long traceback about repo id formats."""

from __future__ import annotations

import os
from pathlib import Path

# File names that no hub id ends with: a dataset or model file given by path.
LOCAL_SUFFIXES = {".jsonl", ".json", ".safetensors", ".bin", ".yaml"}


def looks_local(name: str) -> bool:
    """Whether ``name`` can only be a local path. A hub id is ``name`` or ``owner/name``: no leading ``.``, ``/`` or
    ``~``, at most one slash, no backslash, no file extension, and its owner is not a folder here (``runs/x`` beside a
    ``runs/`` folder is a path that went missing, not a hub repository)."""
    if name.startswith((".", "/", "~")) or "\\" in name or (os.sep != "/" and os.sep in name):
        return True
    if name.count("/") > 1 or Path(name).suffix in LOCAL_SUFFIXES:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def require_local_exists(name: str, what: str, instead: str) -> None:
    """Raise ``FileNotFoundError`` when ``name`` is a local path (:func:`looks_local`) that does not exist; ``what``
    names the thing (``dataset``, ``model``, ``adapter folder``), ``instead`` says what to do."""
    if looks_local(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"{name}: no such {what} (a local path, not a hub id owner/name); {instead}")
