"""GSM8KDataModule on the real files in ../shared/data: row counts, ids, subsets, Platinum filtering, bad input."""

from __future__ import annotations

import json

import pytest

from abel_lightning.data.gsm8k import FILLER_ID, GSM8KDataModule, load_questions, shard_questions
from abel_lightning.jsonl import JsonlError
from abel_lightning.prompts import format_prompt


@pytest.mark.parametrize(
    ("relative", "split", "rows"),
    [
        ("gsm8k/train.jsonl", "train", 7473),
        ("gsm8k/test.jsonl", "test", 1319),
        ("gsm8k_platinum/test.jsonl", "test", 1209),
    ],
)
def test_reads_the_three_shared_files(shared_data, relative, split, rows):
    data = GSM8KDataModule(dataset=str(shared_data / relative), split=split, batch_size=8)
    data.setup("test")
    assert len(data.questions) == rows
    first = data.questions[0]
    assert set(first) == {"question_id", "question", "gold_answer", "prompt"}
    assert first["question_id"] == f"{split}/0"
    assert first["prompt"] == format_prompt(first["question"], "abel")
    batch = next(iter(data.test_dataloader()))
    assert len(batch["question"]) == 8 and batch["question_id"][:2] == [f"{split}/0", f"{split}/1"]


def test_a_folder_holding_split_files_is_a_dataset(shared_data):
    questions = load_questions(str(shared_data / "gsm8k"), split="test")
    assert len(questions) == 1319
    assert questions[0]["gold_answer"] == "18"  # Janet's ducks


def test_platinum_keeps_its_relabelled_answers(shared_data):
    """GSM8K test row 403 is Platinum row 366 or so; its label moved from 81 to 135 (see the alignment file)."""
    alignment = json.loads((shared_data / "gsm8k_platinum/gsm8k_test_alignment.json").read_text())
    relabelled = alignment["relabelled"][0]
    platinum = load_questions(str(shared_data / "gsm8k_platinum/test.jsonl"), split="test")
    assert platinum[relabelled["platinum_row"]]["gold_answer"] == str(relabelled["platinum_final"]).replace(",", "")


def test_n_samples_is_a_seeded_subset_in_source_order(shared_data):
    path = str(shared_data / "gsm8k/train.jsonl")
    a = load_questions(path, "train", n_samples=50, seed=3)
    b = load_questions(path, "train", n_samples=50, seed=3)
    c = load_questions(path, "train", n_samples=50, seed=4)
    ids = [q["question_id"] for q in a]
    assert ids == [q["question_id"] for q in b] != [q["question_id"] for q in c]
    rows = [int(i.split("/")[1]) for i in ids]
    assert rows == sorted(rows) and len(set(rows)) == 50


def test_rows_the_release_marks_rejected_are_dropped_but_ids_stay_stable(tmp_path):
    path = tmp_path / "test.jsonl"
    rows = [
        {"question": "q0", "answer": "x\n#### 1", "cleaning_status": "consensus"},
        {"question": "q1", "answer": "x\n#### 2", "cleaning_status": "rejected"},
        {"question": "q2", "answer": "x\n#### 3", "cleaning_status": "verified"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = load_questions(str(path), "test")
    assert [(q["question_id"], q["gold_answer"]) for q in questions] == [("test/0", "1"), ("test/2", "3")]


def test_bad_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "x\\n#### 1"}\n\n{"question": "q", "answer": "no final line"}\n')
    with pytest.raises(JsonlError) as error:
        load_questions(str(path), "test")
    assert f"{path}:3: field 'answer'" in str(error.value)
    path.write_text('{"question": "q"}\n')
    with pytest.raises(JsonlError, match=r"bad.jsonl:1: field 'answer'"):
        load_questions(str(path), "test")


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such dataset file"):
        load_questions(str(tmp_path / "nope.jsonl"), "train")


@pytest.mark.parametrize("even", [False, True])
def test_rank_shards_hold_each_question_once_and_even_ones_are_topped_up_with_the_filler(even):
    questions = [{"question_id": f"q{i}", "prompt": f"p{i}"} for i in range(7)]
    ranks = [shard_questions(questions, 3, rank, even) for rank in range(3)]
    shares = [[served[i]["question_id"] for i in sampler] for served, sampler in ranks]
    filler = [FILLER_ID] if even else []
    assert shares == [["q0", "q3", "q6"], ["q1", "q4", *filler], ["q2", "q5", *filler]]
    assert [len(sampler) for _, sampler in ranks] == [len(share) for share in shares]
    assert [list(shard_questions([], 2, rank, even)[1]) for rank in range(2)] == [[], []]
