"""Shared fixtures: a tiny random causal LM saved to disk (loaded through the real loading code) and the data paths;
``must_finish_within`` for the tests that feed hostile model text."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's kernels (the decode engine's split-KV attention) then run on CPU tensors in its interpreter, so the
    # tests check them here too. Read when Triton is imported, which nothing has done yet: torch does not import it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        # A clone from the hub has no such folder; the tests that need the real GSM8K files skip, the rest run.
        pytest.skip(f"no {SHARED_DATA}: this test reads the GSM8K copy beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer Llama with random weights and the toy tokenizer, as a local model folder."""
    from abel_lightning.models.tiny import build_random_model

    return str(build_random_model("tiny-llama", tmp_path_factory.mktemp("tiny-llama"), seed=0))


@contextmanager
def must_finish_within(seconds: int):
    """Turn a stall into a failure. Not a benchmark: the hostile inputs it guards take milliseconds when the work is
    linear in the text and minutes (or a RecursionError) when it is not, so the bound is loose on purpose."""

    def stalled(signum, frame):
        raise AssertionError(f"did not finish within {seconds} s: the work is not linear in the text")

    previous = signal.signal(signal.SIGALRM, stalled)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
