import json
import logging

import pytest

from abel_lightning.jsonl import JsonlError, read_jsonl, write_jsonl_atomic
from abel_lightning.preferences import PairCounts, build_pairs, write_preferences
from abel_lightning.schemas import PAIR


def trajectory(text, correct, reward):
    return {
        "full_text": text,
        "answer": "18" if correct else "20",
        "num_tokens": 50,
        "reward": reward,
        "correct": correct,
        "arm": 0,
    }


def rollout(question_id, trajectories):
    return {
        "question_id": question_id,
        "question": f"question {question_id}",
        "prompt": f"Question:\n{question_id}\n",
        "gold_answer": "18",
        "s_end": 0.5,
        "s_path": 1.0,
        "s_cf": 1.0,
        "s_wm": 0.75,
        "trajectories": trajectories,
    }


# k = 4. Worked by hand:
#   test/0: 2 correct x 2 wrong = 4 correctness pairs; coherence A (1.08) vs B (1.06), gap 0.02 > 0.01 -> 1
#   test/1: all correct -> 0 correctness; coherence E (first of the two 1.10s) vs H (1.02), gap 0.08 -> 1
#   test/2: all wrong -> nothing
#   test/3: X twice correct, Z correct, X wrong: (X, X) never pairs, so 1 correctness pair (Z, X);
#           coherence X (1.05) vs the lowest correct with another text, Z (1.00), gap 0.05 -> 1
ROLLOUTS = [
    rollout(
        "test/0",
        [
            trajectory("A", True, 1.08),
            trajectory("B", True, 1.06),
            trajectory("C", False, 0.05),
            trajectory("D", False, 0.04),
        ],
    ),
    rollout(
        "test/1",
        [
            trajectory("E", True, 1.10),
            trajectory("F", True, 1.05),
            trajectory("G", True, 1.10),
            trajectory("H", True, 1.02),
        ],
    ),
    rollout(
        "test/2",
        [
            trajectory("I", False, 0.06),
            trajectory("J", False, 0.05),
            trajectory("K", False, 0.04),
            trajectory("L", False, 0.03),
        ],
    ),
    rollout(
        "test/3",
        [
            trajectory("X", True, 1.05),
            trajectory("X", True, 1.05),
            trajectory("Z", True, 1.00),
            trajectory("X", False, 0.03),
        ],
    ),
]


def test_pairs_worked_by_hand():
    pairs = build_pairs(ROLLOUTS)
    assert [(p["question_id"], p["kind"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("test/0", "correctness", "A", "C"),
        ("test/0", "correctness", "A", "D"),
        ("test/0", "correctness", "B", "C"),
        ("test/0", "correctness", "B", "D"),
        ("test/0", "coherence", "A", "B"),
        ("test/1", "coherence", "E", "H"),
        ("test/3", "correctness", "Z", "X"),
        ("test/3", "coherence", "X", "Z"),
    ]
    assert [p["reward_gap"] for p in pairs] == pytest.approx([1.03, 1.04, 1.01, 1.02, 0.02, 0.08, 0.97, 0.05])
    assert pairs[0]["prompt"] == "Question:\ntest/0\n"
    assert set(pairs[0]) == {"question_id", "prompt", "chosen", "rejected", "kind", "reward_gap"}


def test_identical_correct_texts_give_no_coherence_pair():
    record = rollout("q", [trajectory("same", True, 1.2), trajectory("same", True, 1.2), trajectory("w", False, 0.0)])
    assert [p["kind"] for p in build_pairs([record])] == ["correctness", "correctness"]


@pytest.mark.parametrize(("threshold", "kept"), [(0.25, False), (0.2499, True)])
def test_gap_equal_to_threshold_is_dropped(threshold, kept):
    record = rollout("q", [trajectory("long", True, 1.0), trajectory("short", True, 1.25)])
    pairs = build_pairs([record], threshold=threshold)
    assert pairs == (
        [
            {
                "question_id": "q",
                "prompt": record["prompt"],
                "chosen": "short",
                "rejected": "long",
                "kind": "coherence",
                "reward_gap": 0.25,
            }
        ]
        if kept
        else []
    )


def write_rollouts(path, records):
    write_jsonl_atomic(path, records)
    return path


def test_write_preferences(tmp_path, caplog):
    rollouts = write_rollouts(tmp_path / "rollouts.jsonl", ROLLOUTS)
    out = tmp_path / "prefs" / "pairs.jsonl"
    with caplog.at_level(logging.INFO, logger="abel_lightning.preferences"):
        counts = write_preferences(rollouts, out)
    assert counts == PairCounts(correctness=5, coherence=3, questions=4)
    assert read_jsonl(out, PAIR) == build_pairs(ROLLOUTS)
    assert "5 correctness and 3 coherence pairs from 4 questions" in caplog.text
    assert "WARNING" not in caplog.text


def test_zero_coherence_pairs_warns_with_cause_and_fix(tmp_path, caplog):
    rollouts = write_rollouts(tmp_path / "rollouts.jsonl", ROLLOUTS)
    with caplog.at_level(logging.WARNING, logger="abel_lightning.preferences"):
        counts = write_preferences(rollouts, tmp_path / "pairs.jsonl", threshold=0.1)
    assert counts == PairCounts(correctness=5, coherence=0, questions=4)
    assert "scored within the threshold (largest gap 0.08 <= 0.1)" in caplog.text
    assert "Lower --threshold below 0.08" in caplog.text


def test_zero_coherence_pairs_without_two_correct_answers(tmp_path, caplog):
    rollouts = write_rollouts(tmp_path / "rollouts.jsonl", [ROLLOUTS[2]])
    with caplog.at_level(logging.WARNING, logger="abel_lightning.preferences"):
        counts = write_preferences(rollouts, tmp_path / "pairs.jsonl")
    assert counts == PairCounts(correctness=0, coherence=0, questions=1)
    assert "no question had two correct trajectories with different texts" in caplog.text
    assert read_jsonl(tmp_path / "pairs.jsonl") == []


def test_malformed_rollouts_write_nothing(tmp_path):
    bad = json.loads(json.dumps(ROLLOUTS[1]))
    bad["trajectories"][2]["reward"] = "high"
    rollouts = write_rollouts(tmp_path / "rollouts.jsonl", [ROLLOUTS[0], bad])
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(JsonlError, match=r"rollouts.jsonl:2: field 'trajectories\[2\].reward': expected float"):
        write_preferences(rollouts, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["rollouts.jsonl"]
