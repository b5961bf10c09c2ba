"""Phase 2 rollout throughput: the project's sampling path (LoRA merged into the weights, chunked ``generate``)
against plain ``model.generate`` on the PEFT model with the adapter unmerged, in the same process, both warmed up.

    python bench/rollout.py --model mistral-7b-random --questions 64 --samples 8 --new-tokens 256

Prints questions/s and tokens/s of each and the ratio. Random weights never emit EOS, so every row decodes the full
``--new-tokens``.
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import get_peft_model

from abel_lightning.data.toy import make_problems
from abel_lightning.models.generation import SamplingSettings, generate
from abel_lightning.models.loading import LoraSettings, load_base, load_tokenizer
from bench.models import gib, materialize


def prompts_of(tokenizer, n: int, prompt_tokens: int) -> list[str]:
    """``n`` word-problem prompts cut to ``prompt_tokens`` tokens (the issue's baseline uses 160)."""
    text = " ".join(p["question"] for p in make_problems(200, seed=1))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[i * 7 : i * 7 + prompt_tokens]) for i in range(n)]


def timed(fn) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mistral-7b-random")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=160)
    args = parser.parse_args()

    path = materialize(args.model)
    tokenizer = load_tokenizer(path)
    model = get_peft_model(load_base(path, "bfloat16").cuda(), LoraSettings().to_peft()).eval()
    prompts = prompts_of(tokenizer, args.questions, args.prompt_tokens)
    settings = SamplingSettings(temperature=0.7, top_p=0.95, max_new_tokens=args.new_tokens)
    rows = args.questions * args.samples

    def plain():
        encoded = tokenizer(prompts, return_tensors="pt", padding=True).to("cuda")
        with torch.no_grad():
            model.generate(**encoded, do_sample=True, temperature=0.7, top_p=0.95, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, num_return_sequences=args.samples,
                           pad_token_id=tokenizer.pad_token_id)

    produced = []

    def ours():
        groups = generate(merged, tokenizer, prompts, settings, args.samples)
        produced.append(sum(len(c.response_ids) for group in groups for c in group))

    timed(plain)  # warm-up: the first generate of a process runs 3-4x slower
    plain_s = timed(plain)
    merged = model.merge_and_unload()
    timed(ours)
    ours_s = timed(ours)
    tokens = rows * args.new_tokens
    print("\n| path | questions/s | tokens/s | ratio |\n|---|---|---|---|")
    print(f"| plain generate, PEFT adapter unmerged (baseline) | {args.questions / plain_s:.2f} | {tokens / plain_s:,.0f} | 1.00 |")
    print(f"| abel-lightning rollouts (merged LoRA) | {args.questions / ours_s:.2f} | {produced[-1] / ours_s:,.0f} "
          f"| {(produced[-1] / ours_s) / (tokens / plain_s):.2f} |")
    print(f"\n{rows} rows x {args.new_tokens} new tokens, prompt {args.prompt_tokens} tokens; "
          f"peak memory {gib(torch.cuda.max_memory_allocated()):.1f} GiB; {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
