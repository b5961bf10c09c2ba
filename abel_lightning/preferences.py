"""Phase 3: turn Regime W rollouts into DPO preference pairs.

Two kinds of pair per question:
- ``correctness``: every (correct, incorrect) combination of its trajectories, the correct one chosen;
- ``coherence``: when it has at least two correct trajectories, its highest-reward correct one (chosen) against its
  lowest-reward correct one (rejected), kept only when the reward gap exceeds ``threshold``. Among correct answers the
  reward differs only by Regime W's coherence, agreement and length terms, so this pair teaches the shorter, more
  coherent solution.

Trajectories with the same text never pair with each other, and a blank one pairs with none: DPO's loss on a pair of
identical sequences is constant and teaches nothing, and Phase 4 refuses both (:func:`pair_problem`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from abel_lightning.jsonl import EmptyJsonlError, JsonlError, iter_numbered_jsonl, write_jsonl_atomic
from abel_lightning.schemas import PAIR, ROLLOUT

logger = logging.getLogger(__name__)


@dataclass
class PairCounts:
    """How many pairs of each kind were written, and from how many questions (rollout records) read."""

    correctness: int
    coherence: int
    questions: int


def build_pairs(records: Iterable[dict], threshold: float = 0.01) -> list[dict]:
    """Preference pairs of rollout records (the ROLLOUT schema), in record order, then trajectory order.

    Per record: its correctness pairs (chosen index, then rejected index ascending), then its coherence pair if any.
    Each pair is ``{"question_id", "prompt", "chosen", "rejected", "kind", "reward_gap"}`` with the record's prompt
    and the trajectories' completions; ``reward_gap = reward(chosen) - reward(rejected)``.

    Example: rewards ``[1.08 correct, 1.06 correct, 0.05 wrong, 0.04 wrong]`` give 4 correctness pairs and one
    coherence pair (gap 0.02 > 0.01); with ``threshold=0.05`` the coherence pair is dropped.
    """
    pairs = []
    for record in records:
        correct = [t for t in record["trajectories"] if t["correct"]]
        incorrect = [t for t in record["trajectories"] if not t["correct"]]
        for chosen in correct:
            for rejected in incorrect:
                pairs.append(_pair(record, chosen, rejected, "correctness"))
        coherence = _coherence_pair(correct)
        if coherence is not None:
            chosen, rejected = coherence
            if chosen["reward"] - rejected["reward"] > threshold:
                pairs.append(_pair(record, chosen, rejected, "coherence"))
    return [pair for pair in pairs if pair_problem(pair) is None]


def pair_problem(pair: dict) -> tuple[str, str] | None:
    """``(field, what it should be)`` when DPO cannot learn from ``pair``: a blank ``chosen`` or ``rejected`` (no
    text but whitespace), or the two equal (a constant loss); None for a usable pair."""
    for side in ("chosen", "rejected"):
        if not pair[side].strip():
            return side, "a response with some text (not empty or whitespace only)"
    if pair["chosen"] == pair["rejected"]:
        return "rejected", "a response different from chosen"
    return None


def read_rollouts(path: str | Path) -> list[dict]:
    """The records of a Phase 2 rollouts file (the ROLLOUT schema), refusing what would make no or wrong pairs: no
    records at all, a record without trajectories, a question_id that an earlier line already holds (its pairs would
    count twice). Raises :class:`JsonlError` naming the line, or :class:`EmptyJsonlError`."""
    records, first_line = [], {}
    for line, record in iter_numbered_jsonl(path, ROLLOUT):
        if not record["trajectories"]:
            raise JsonlError(path, line, "trajectories", "a non-empty list of trajectories", [])
        question_id = record["question_id"]
        if question_id in first_line:
            expected = f"a question_id not already on line {first_line[question_id]}"
            raise JsonlError(path, line, "question_id", expected, question_id)
        first_line[question_id] = line
        records.append(record)
    if not records:
        raise EmptyJsonlError(path, "run Phase 2 (`abel-lightning predict --config configs/rollouts.yaml`) to fill it")
    return records


def write_preferences(rollouts: str | Path, out: str | Path, threshold: float = 0.01) -> PairCounts:
    """Read Phase 2 rollouts, build their preference pairs and write them to ``out`` (JSONL, the PAIR schema).

    Invalid rollouts (:func:`read_rollouts`) raise :class:`abel_lightning.jsonl.JsonlError` (file, line and field)
    and nothing is written.
    The output replaces ``out`` atomically, so a failed run never leaves a partial pairs file.
    """
    records = read_rollouts(rollouts)
    pairs = build_pairs(records, threshold)
    write_jsonl_atomic(out, pairs, PAIR)
    counts = PairCounts(
        correctness=sum(pair["kind"] == "correctness" for pair in pairs),
        coherence=sum(pair["kind"] == "coherence" for pair in pairs),
        questions=len(records),
    )
    logger.info(
        "%s: %d correctness and %d coherence pairs from %d questions (threshold %g)",
        out,
        counts.correctness,
        counts.coherence,
        counts.questions,
        threshold,
    )
    if counts.coherence == 0:
        _warn_no_coherence_pairs(records, threshold)
    return counts


def _coherence_pair(correct: list[dict]) -> tuple[dict, dict] | None:
    """Highest-reward correct trajectory and the lowest-reward correct one with a different text (first on ties)."""
    if len(correct) < 2:
        return None
    chosen = max(correct, key=lambda t: t["reward"])
    distinct = [t for t in correct if t["full_text"] != chosen["full_text"]]
    if not distinct:
        return None
    return chosen, min(distinct, key=lambda t: t["reward"])


def _pair(record: dict, chosen: dict, rejected: dict, kind: str) -> dict:
    return {
        "question_id": record["question_id"],
        "prompt": record["prompt"],
        "chosen": chosen["full_text"],
        "rejected": rejected["full_text"],
        "kind": kind,
        "reward_gap": chosen["reward"] - rejected["reward"],
    }


def _warn_no_coherence_pairs(records: list[dict], threshold: float) -> None:
    """Explain an empty coherence set: no question had two distinct correct answers, or all gaps were too small."""
    gaps = []
    for record in records:
        coherence = _coherence_pair([t for t in record["trajectories"] if t["correct"]])
        if coherence is not None:
            gaps.append(coherence[0]["reward"] - coherence[1]["reward"])
    if not gaps:
        logger.warning(
            "no coherence pairs: no question had two correct trajectories with different texts. Sample more "
            "trajectories per question (Regime W k) or start from a stronger policy."
        )
        return
    logger.warning(
        "no coherence pairs: in all %d questions with two or more distinct correct trajectories, those trajectories "
        "scored within the threshold (largest gap %.4g <= %g). Lower --threshold below %.4g to keep them.",
        len(gaps),
        max(gaps),
        threshold,
        max(gaps),
    )
