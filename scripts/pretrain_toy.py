"""Rebuild the shipped toy base model (``abel_lightning/assets/toy-base``) from scratch, on CPU, in a few minutes.

    python scripts/pretrain_toy.py

Generates toy GSM8K problems, trains a byte-level BPE tokenizer on them, and pretrains the ``toy-llama`` preset on
``prompt + solution + eos`` with the loss on the solution only. In a share of the examples (``blurt_rate``) the
solution is a blurted guess instead, ``#### N`` with N a number copied from the question: the base learns two habits,
to work the problem out (which it often gets right) or to blurt (which is always wrong), and takes either about equally
often. That is the room reinforcement learning is for: rewarding right answers should teach it to work problems out,
as rewarding correctness does for a real model that sometimes answers without reasoning.
"""

from __future__ import annotations

import math
import random
import re
import tempfile
import time
from pathlib import Path

import torch
from jsonargparse import auto_cli
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from abel_lightning.answers import extract_answer, extract_gold, is_correct
from abel_lightning.data.toy import write_toy_dataset
from abel_lightning.jsonl import read_jsonl
from abel_lightning.models.generation import SamplingSettings, generate
from abel_lightning.models.tiny import build_tokenizer, random_model, toy_base_path
from abel_lightning.prompts import format_prompt

IGNORE_INDEX = -100

README = """# toy-base: a tiny pretrained model for the toy GSM8K task

A {vocab}-token byte-level BPE tokenizer and a {params:.1f}M-parameter Llama (the `toy-llama` preset of
`abel_lightning.models.tiny`: hidden 256, 4 layers, 4 heads, tied embeddings), pretrained from scratch on CPU
so that the whole pipeline can be seen learning on a laptop. The weights are stored in bfloat16 ({weights_mb:.1f} MB)
to keep the package small; load them in float32 on CPU.

## How it was made

    python scripts/pretrain_toy.py

Problems: `abel_lightning.data.toy.write_toy_dataset(dir, n_train={n_train}, n_test={n_test}, seed={data_seed})`.
The model saw the train split as `<s> prompt solution </s>`, with Abel's prompt and the loss on the solution
only, for {steps} AdamW steps of {batch_size} examples (model seed {seed}). In {blurt_rate:.0%} of the examples
the solution was replaced by a blurted guess, `#### N` with N a number copied from the question: the base has two
habits, working the problem out step by step or blurting, and takes either about equally often. Blurts are wrong,
so reinforcement learning on correctness has room to teach it to work problems out.

## Measured accuracy

On the {n_test} held-out problems, `test.jsonl` of `write_toy_dataset(dir, seed={data_seed})` (any `n_train`
gives the same test set), comparing the final number of each generated solution with the gold `#### N`:

| decoding | accuracy |
| --- | --- |
| greedy | {greedy:.1%} |
| sampled, temperature 1.0 | {sampled:.1%} |
| sampled, solutions that show their work | {worked:.1%} of {n_worked} |
| sampled, blurted solutions (`#### N` alone) | {blurted:.1%} of {n_blurted} |

Pretraining took {train_minutes:.1f} min and the whole script {minutes:.1f} min on {threads} CPU threads.

## Tokenizer

`<s>` = {bos} (the tokenizer prepends it), `</s>` = {eos}, `<pad>` = {pad}, `<unk>` = {unk}. Digits are one
token each, and decoding restores the text exactly. Contexts hold up to 512 tokens; a prompt is about 40
tokens and a solution about 40 (at most about 75).
"""


def blurt_answers(rows: list[dict], rate: float, seed: int) -> list[dict]:
    """``rows`` with a seeded share ``rate`` of their solutions replaced by a blurted guess: ``#### N`` where N is a
    number copied from the question (never the right answer), the habit of a reader who answers without working."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        guesses = [n for n in re.findall(r"\d+", row["question"]) if n != extract_gold(row["answer"])]
        out.append({**row, "answer": f"#### {rng.choice(guesses)}"} if guesses and rng.random() < rate else row)
    return out


def encode(rows: list[dict], tokenizer: PreTrainedTokenizerFast) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per row: ``<s> prompt solution </s>``, labels masked over ``<s> prompt``.

    Prompt and solution are tokenized apart so the prompt's tokens are exactly those the model sees when generating.
    """
    examples = []
    for row in rows:
        prompt = tokenizer(format_prompt(row["question"])).input_ids
        solution = tokenizer(row["answer"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        examples.append((prompt + solution, [IGNORE_INDEX] * len(prompt) + solution))
    return examples


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, labels in examples:
        pad = width - len(ids)
        batch["input_ids"].append(ids + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(ids) + [0] * pad)
        batch["labels"].append(labels + [IGNORE_INDEX] * pad)
    return {key: torch.tensor(value) for key, value in batch.items()}


def pretrain(
    model: PreTrainedModel,
    examples: list[tuple[list[int], list[int]]],
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    seed: int,
) -> None:
    """AdamW with linear warmup and cosine decay to 10% of ``lr``, reshuffling the examples every epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    model.train()
    for step in range(steps):
        if len(order) < batch_size:
            order = torch.randperm(len(examples), generator=generator).tolist()
        batch = collate([examples[i] for i in order[:batch_size]], pad_id)
        order = order[batch_size:]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}", flush=True)


def solve(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, rows: list[dict], temperature: float
) -> list[tuple[bool, bool]]:
    """``(correct, shows_work)`` per row for one generated solution (greedy when ``temperature`` is 0)."""
    model.eval()
    prompts = [format_prompt(row["question"]) for row in rows]
    settings = SamplingSettings(temperature=temperature, max_new_tokens=128)
    completions = generate(model, tokenizer, prompts, settings, max_batch_rows=100)
    return [
        (is_correct(extract_answer(samples[0].text), extract_gold(row["answer"])), "<<" in samples[0].text)
        for samples, row in zip(completions, rows)
    ]


# The packaged base's folder, where a rebuilt toy base replaces the shipped one by default.
TOY_BASE = toy_base_path()


def main(
    out_dir: Path = TOY_BASE,
    n_train: int = 8000,
    n_test: int = 200,
    data_seed: int = 0,
    seed: int = 0,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup_steps: int = 50,
    vocab_size: int = 512,
    blurt_rate: float = 0.5,
    threads: int = 2,
) -> dict[str, float]:
    """Rebuild the toy base into ``out_dir`` and report its held-out accuracy, greedy and sampled at temperature 1.

    The held-out problems are ``test.jsonl`` of ``write_toy_dataset(dir, n_test=n_test, seed=data_seed)``; a share
    ``blurt_rate`` of the training solutions are blurted guesses.
    """
    start = time.time()
    out_dir = Path(out_dir)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as data_dir:
        paths = write_toy_dataset(data_dir, n_train=n_train, n_test=n_test, seed=data_seed)
        train, test = read_jsonl(paths["train"]), read_jsonl(paths["test"])

    tokenizer = build_tokenizer((format_prompt(row["question"]) + row["answer"] for row in train), vocab_size)
    model = random_model("toy-llama", tokenizer, seed=seed)
    print(f"toy-llama: {model.num_parameters() / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")
    corpus = blurt_answers(train, blurt_rate, seed)
    pretrain(model, encode(corpus, tokenizer), tokenizer.pad_token_id, steps, batch_size, lr, warmup_steps, seed)
    train_minutes = (time.time() - start) / 60

    # Ship bfloat16 weights (half the size) and measure the model as shipped, reloaded from disk.
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)  # the sampled accuracy is then reproducible too
    greedy = solve(model, tokenizer, test, temperature=0.0)
    sampled = solve(model, tokenizer, test, temperature=1.0)
    worked = [correct for correct, shows_work in sampled if shows_work]
    blurted = [correct for correct, shows_work in sampled if not shows_work]
    results = {
        "greedy": sum(correct for correct, _ in greedy) / len(test),
        "sampled": sum(correct for correct, _ in sampled) / len(test),
        "worked": sum(worked) / max(1, len(worked)),
        "blurted": sum(blurted) / max(1, len(blurted)),
    }
    minutes = (time.time() - start) / 60
    print(
        f"held-out accuracy on {n_test} problems: greedy {results['greedy']:.1%}, "
        f"sampled (T=1) {results['sampled']:.1%} (working shown {results['worked']:.1%} of {len(worked)}, "
        f"blurted {results['blurted']:.1%} of {len(blurted)}); "
        f"pretraining {train_minutes:.1f} min, total {minutes:.1f} min"
    )
    (out_dir / "README.md").write_text(
        README.format(
            **results,
            n_worked=len(worked),
            n_blurted=len(blurted),
            blurt_rate=blurt_rate,
            n_train=n_train,
            n_test=n_test,
            data_seed=data_seed,
            seed=seed,
            steps=steps,
            batch_size=batch_size,
            threads=threads,
            train_minutes=train_minutes,
            minutes=minutes,
            vocab=len(tokenizer),
            params=model.num_parameters() / 1e6,
            weights_mb=(out_dir / "model.safetensors").stat().st_size / 1e6,
            bos=tokenizer.bos_token_id,
            eos=tokenizer.eos_token_id,
            pad=tokenizer.pad_token_id,
            unk=tokenizer.unk_token_id,
        )
    )
    return results


if __name__ == "__main__":
    auto_cli(main)
