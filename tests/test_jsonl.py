import json
import logging

import pytest

from abel_lightning.jsonl import (
    JsonlAppender,
    JsonlError,
    SchemaError,
    iter_jsonl,
    read_jsonl,
    validate,
    write_jsonl_atomic,
)
from abel_lightning.schemas import EVAL, PAIR, QUESTION, ROLLOUT


def trajectory(**changes):
    record = {
        "full_text": "3 * 6 = 18. The answer is 18.",
        "answer": "18",
        "num_tokens": 12,
        "reward": 1.02,
        "correct": True,
        "arm": 0,
    }
    return {**record, **changes}


def rollout(**changes):
    record = {
        "question_id": "test/0",
        "question": "Q?",
        "prompt": "Question:\nQ?\nAnswer:\n",
        "gold_answer": "18",
        "s_end": 1,
        "s_path": 0.98,
        "s_cf": 1.0,
        "s_wm": 0.994,
        "trajectories": [trajectory(), trajectory(answer=None, correct=False, reward=0)],
    }
    return {**record, **changes}


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_round_trip_atomic(tmp_path):
    records = [rollout(), rollout(question_id="test/1", question="Ünïcode – ok?")]
    path = tmp_path / "deep" / "folder" / "rollouts.jsonl"
    assert write_jsonl_atomic(path, records, ROLLOUT) == 2
    assert read_jsonl(path, ROLLOUT) == records
    assert path.read_text(encoding="utf-8").count("\n") == 2


def test_round_trip_appender(tmp_path):
    path = tmp_path / "evals.jsonl"
    record = {
        "question_id": "test/0",
        "question": "Q?",
        "gold_answer": "18",
        "completion": "The answer is 18.",
        "answer": "18",
        "correct": True,
        "num_tokens": 7,
    }
    with JsonlAppender(path, EVAL) as out:
        out.append(record)
    with JsonlAppender(path, EVAL) as out:
        out.append({**record, "question_id": "test/1"})
    assert [r["question_id"] for r in read_jsonl(path, EVAL)] == ["test/0", "test/1"]


def test_blank_lines_are_skipped_and_extra_fields_allowed(tmp_path):
    path = write_lines(
        tmp_path / "q.jsonl", '{"question_id": "a", "question": "Q", "gold_answer": "1", "x": 5}', "", "  "
    )
    assert list(iter_jsonl(path, QUESTION)) == [{"question_id": "a", "question": "Q", "gold_answer": "1", "x": 5}]


GOOD = json.dumps(rollout())


@pytest.mark.parametrize(
    ("bad_line", "field", "message"),
    [
        ('{"question_id": "test/1", ', None, "not valid JSON (Expecting property name enclosed in double quotes"),
        ('{"s_end": NaN}', None, "not valid JSON (NaN is not a JSON number)"),
        ("[1, 2]", None, "expected a JSON object, got [1, 2]"),
        (
            json.dumps({k: v for k, v in rollout().items() if k != "prompt"}),
            "prompt",
            "field 'prompt': expected str, got nothing (the field is missing)",
        ),
        (json.dumps(rollout(s_cf="high")), "s_cf", "field 's_cf': expected float, got 'high'"),
        (json.dumps(rollout(s_end=True)), "s_end", "field 's_end': expected float, got True"),
        (json.dumps(rollout(trajectories={"a": 1})), "trajectories", "expected a list of objects, got {'a': 1}"),
        (json.dumps(rollout(trajectories=[trajectory(), 5])), "trajectories[1]", "expected a JSON object, got 5"),
        (
            json.dumps(rollout(trajectories=[trajectory()] * 3 + [trajectory(reward="1.0")])),
            "trajectories[3].reward",
            "field 'trajectories[3].reward': expected float, got '1.0'",
        ),
        (
            json.dumps(rollout(trajectories=[trajectory(num_tokens=True)])),
            "trajectories[0].num_tokens",
            "expected int, got True",
        ),
        (
            json.dumps(rollout(trajectories=[trajectory(num_tokens=12.0)])),
            "trajectories[0].num_tokens",
            "expected int, got 12.0",
        ),
        (json.dumps(rollout(trajectories=[trajectory(correct=1)])), "trajectories[0].correct", "expected bool, got 1"),
        (
            json.dumps(rollout(trajectories=[trajectory(answer=18)])),
            "trajectories[0].answer",
            "expected str or null, got 18",
        ),
    ],
)
def test_malformed_rollout_names_file_line_field(tmp_path, bad_line, field, message):
    path = write_lines(tmp_path / "rollouts.jsonl", GOOD, "", bad_line, GOOD)
    with pytest.raises(JsonlError) as caught:
        read_jsonl(path, ROLLOUT)
    error = caught.value
    assert (error.path, error.line, error.field) == (str(path), 3, field)
    assert str(error).startswith(f"{path}:3: ")
    assert message in str(error)
    assert str(error).endswith("Fix or remove this line.")


@pytest.mark.parametrize(
    ("kind", "ok"), [("correctness", True), ("coherence", True), ("Coherence", False), ("length", False), (1, False)]
)
def test_pair_kind_values(kind, ok):
    pair = {"question_id": "q", "prompt": "p", "chosen": "c", "rejected": "r", "kind": kind, "reward_gap": 1}
    if ok:
        validate(pair, PAIR)
    else:
        with pytest.raises(SchemaError, match="field 'kind': expected one of 'coherence', 'correctness'"):
            validate(pair, PAIR)


def test_message_format():
    error = JsonlError("rollouts.jsonl", 3, "trajectories[1].reward", "float", "high")
    assert (
        str(error)
        == "rollouts.jsonl:3: field 'trajectories[1].reward': expected float, got 'high'. Fix or remove this line."
    )
    assert str(JsonlError("a.jsonl", 2, None, reason="Expecting value at column 1")).startswith(
        "a.jsonl:2: not valid JSON (Expecting value at column 1)"
    )


def test_long_values_are_shortened_in_messages(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", json.dumps(rollout(trajectories=[trajectory(answer=["x" * 500])])))
    with pytest.raises(JsonlError) as caught:
        read_jsonl(path, ROLLOUT)
    assert len(str(caught.value)) < 250


def test_atomic_writer_leaves_nothing_when_records_fail_midway(tmp_path):
    def records():
        yield rollout()
        raise RuntimeError("generation crashed")

    path = tmp_path / "out" / "rollouts.jsonl"
    with pytest.raises(RuntimeError, match="generation crashed"):
        write_jsonl_atomic(path, records())
    assert list(path.parent.iterdir()) == []


def test_atomic_writer_keeps_the_previous_file_on_failure(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl_atomic(path, [{"a": 1}])
    with pytest.raises(JsonlError, match=r"pairs.jsonl:2: field 'a': expected int"):
        write_jsonl_atomic(path, [{"a": 2}, {"a": "two"}], {"a": int})
    assert read_jsonl(path) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]


def test_appender_truncates_a_partial_tail(tmp_path, caplog):
    path = tmp_path / "rollouts.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b": "cut sh', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="abel_lightning.jsonl"):
        with JsonlAppender(path) as out:
            out.append({"a": 4})
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 4}]
    assert "dropped an incomplete last line (21 bytes" in caplog.text


def test_appender_truncates_a_file_that_is_only_a_partial_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a": ')
    JsonlAppender(path).close()
    assert path.read_bytes() == b""


def test_appender_validates_before_writing(tmp_path):
    path = tmp_path / "q.jsonl"
    with JsonlAppender(path, QUESTION) as out:
        out.append({"question_id": "a", "question": "Q", "gold_answer": "1"})
        with pytest.raises(JsonlError, match=r"q.jsonl:2: field 'gold_answer': expected str, got 1\."):
            out.append({"question_id": "b", "question": "Q", "gold_answer": 1})
    assert len(read_jsonl(path)) == 1


def test_partial_tail_is_an_error_unless_tolerated(tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "b', encoding="utf-8")
    with pytest.raises(JsonlError, match=r"r.jsonl:2: not valid JSON"):
        read_jsonl(path)
    with caplog.at_level(logging.WARNING, logger="abel_lightning.jsonl"):
        assert read_jsonl(path, tolerate_partial_tail=True) == [{"a": 1}]
    assert "r.jsonl:2: ignoring the incomplete last line" in caplog.text
    # A complete file reads the same either way.
    path.write_text('{"a": 1}\n', encoding="utf-8")
    assert read_jsonl(path, tolerate_partial_tail=True) == [{"a": 1}]


def test_nan_is_never_written(tmp_path):
    with pytest.raises(ValueError, match="Out of range float"):
        write_jsonl_atomic(tmp_path / "x.jsonl", [{"reward": float("nan")}])
    assert list(tmp_path.iterdir()) == []
