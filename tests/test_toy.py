import re

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from abel_lightning.data.toy import make_problems, write_toy_dataset
from abel_lightning.jsonl import read_jsonl
from abel_lightning.models.tiny import build_random_model, build_tokenizer, toy_base_path

ANNOTATION = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)")


def test_make_problems_is_deterministic_and_prefix_stable():
    assert make_problems(50, seed=3) == make_problems(50, seed=3)
    assert make_problems(50, seed=3) != make_problems(50, seed=4)
    assert make_problems(20, seed=3) == make_problems(50, seed=3)[:20]


def test_answers_follow_their_annotations():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    for problem in make_problems(300, seed=0):
        *steps, final = problem["answer"].split("\n")
        assert 1 <= len(steps) <= 3
        values = []
        for line in steps:
            ((a, op, b, result, shown),) = ANNOTATION.findall(line)
            assert ops[op](int(a), int(b)) == int(result) == int(shown)
            assert 0 <= int(result) < 200
            values.append(int(result))
        assert final == f"#### {values[-1]}"


def test_write_toy_dataset_splits_are_disjoint_and_test_is_fixed(tmp_path):
    paths = write_toy_dataset(tmp_path / "a", n_train=300, n_test=50, seed=0)
    rows = {split: read_jsonl(path) for split, path in paths.items()}
    assert [len(rows["train"]), len(rows["test"])] == [300, 50]
    assert set(rows["train"][0]) == {"question", "answer"}
    assert not {r["question"] for r in rows["train"]} & {r["question"] for r in rows["test"]}
    other = write_toy_dataset(tmp_path / "b", n_train=10, n_test=50, seed=0)
    assert open(other["test"]).read() == open(paths["test"]).read()


def test_tokenizer_round_trips_and_splits_digits():
    problems = make_problems(200, seed=0)
    tokenizer = build_tokenizer(p["question"] + "\n" + p["answer"] for p in problems)
    text = "Question:\n" + problems[0]["question"] + "\n\n" + problems[0]["answer"] + "  é?"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.tokenize("123") == ["1", "2", "3"]
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3


def test_random_tiny_llama_loads_and_generates(tmp_path):
    tokenizer = build_tokenizer(p["question"] + "\n" + p["answer"] for p in make_problems(200, seed=0))
    out_dir = build_random_model("tiny-llama", tmp_path, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    tokenizer.padding_side = "left"
    batch = tokenizer(["Tom has 3 apples.", "Anna has"], return_tensors="pt", padding=True)
    output = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape == (2, batch["input_ids"].shape[1] + 4)


def test_shipped_toy_base_loads():
    tokenizer = AutoTokenizer.from_pretrained(toy_base_path())
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    model = AutoModelForCausalLM.from_pretrained(toy_base_path(), dtype=torch.float32)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
