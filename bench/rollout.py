"""Phase 2 rollout throughput: plain ``model.generate`` on the PEFT model with the adapter unmerged (the baseline),
then the project's ``generate`` on the merged model with each decoder: Hugging Face's ``model.generate``, the static
decode engine replaying CUDA graphs (its step with PyTorch's ops, SDPA over KV buckets, then as it runs by default
on a GPU: ``decode_kernels``' Triton kernels, split-KV attention), and the same engine run eagerly. All in one
process, each warmed up by one untimed call (the first call of a process runs 3-4x slower; the engine captures its
graphs in it).

    python bench/rollout.py --model mistral-7b-random --questions 64 --samples 8 --new-tokens 256
    python bench/rollout.py --paths arms       # only the single-setting engine run against Regime W's 8 arms
    python bench/rollout.py --paths kernels    # only the engine's step with PyTorch's ops against Triton's

Regime W's arms (issue 18): "one setting" is the engine on k samples per prompt at temperature 0.7, top_p 0.95 (the
seed's single setting); "8 arms" decodes the same rows as ``PolicyModule`` does with the shipped
``configs/rollouts.yaml`` arms: each question's k rows with their own temperature (0.20-0.50) and top_p, side by side
in one batch, the question's prompt prefilled once. Same rows, same lengths: the ratio is the cost of per-row settings.

Prints questions/s and tokens/s of each path, the ratio to the baseline, and the share of the roofline
(``bench.models.decode_roofline``): a step's matrix products take the larger of reading every weight and doing
2 x parameters FLOP per row, then attention reads each row's cache in use; the copy bandwidth and the bf16 matmul
rate are measured in the same run.
Random weights never emit EOS, and ``min_new_tokens`` keeps EOS out anyway, so every row decodes ``--new-tokens``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/x.py` puts bench/ on sys.path, not the checkout: make `bench` importable from the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

from abel_lightning.data.toy import make_problems  # noqa: E402
from abel_lightning.models.decode_engine import decode_engine  # noqa: E402
from abel_lightning.models.generation import SamplingSettings, generate  # noqa: E402
from abel_lightning.models.loading import LoraSettings, load_base, load_tokenizer  # noqa: E402
from bench.models import copy_bandwidth, decode_roofline, gib, materialize, matmul_tflops  # noqa: E402


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
    parser.add_argument(
        "--paths",
        choices=["all", "arms", "kernels"],
        default="all",
        help="all: baseline, every decoder and the arms; arms: one setting against 8 arms (engine); kernels: the "
        "engine's step with PyTorch's ops against its Triton kernels",
    )
    args = parser.parse_args()

    path = materialize(args.model)
    tokenizer = load_tokenizer(path)
    model = get_peft_model(load_base(path, "bfloat16").cuda(), LoraSettings().to_peft()).eval()
    prompts = prompts_of(tokenizer, args.questions, args.prompt_tokens)
    settings = {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    rows = args.questions * args.samples
    tokens = rows * args.new_tokens

    def plain():
        encoded = tokenizer(prompts, return_tensors="pt", padding=True).to("cuda")
        with torch.no_grad():
            model.generate(
                **encoded,
                do_sample=True,
                temperature=0.7,
                top_p=0.95,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                num_return_sequences=args.samples,
                pad_token_id=tokenizer.pad_token_id,
            )

    # The shipped configs/rollouts.yaml arms, cycled over the k samples of a question as the uniform allocation does.
    arm_settings = [
        SamplingSettings(**{**settings, "temperature": t, "top_p": 0.95 if t < 0.45 else 1.0})
        for t in (0.20, 0.24, 0.29, 0.33, 0.37, 0.41, 0.46, 0.50)
    ]

    def arms():
        rows_prompts = [p for p in prompts for _ in range(args.samples)]
        per_row = [arm_settings[j % len(arm_settings)] for _ in prompts for j in range(args.samples)]
        groups = generate(merged, tokenizer, rows_prompts, per_row, 1)
        assert sum(len(c.response_ids) for group in groups for c in group) >= 0.98 * tokens, "rows ended early"

    def ours(kernels="auto", **decoder):
        def run():
            decode_engine(merged).kernels = kernels
            groups = generate(merged, tokenizer, prompts, SamplingSettings(**settings, **decoder), args.samples)
            # Every row decodes the full length (min_new_tokens); a random model can still draw the pad token, after
            # which the completion is cut, so allow a few tokens short.
            assert sum(len(c.response_ids) for group in groups for c in group) >= 0.98 * tokens, "rows ended early"

        return run

    warmup, seconds = {}, {}

    def measure(name, run):
        warmup[name] = timed(run)
        seconds[name] = timed(run)

    if args.paths == "all":
        measure("plain `model.generate`, PEFT adapter unmerged (baseline)", plain)
    merged = model.merge_and_unload()
    if args.paths == "all":
        measure("abel-lightning `generate`, merged LoRA, engine hf (`model.generate`)", ours(engine="hf"))
    if args.paths in ("all", "kernels"):
        measure(
            "abel-lightning `generate`, merged LoRA, static engine + CUDA graphs, PyTorch's ops (SDPA over KV buckets)",
            ours(engine="static", kernels="torch"),
        )
    measure("abel-lightning `generate`, merged LoRA, static engine + CUDA graphs, one setting", ours(engine="static"))
    if args.paths != "kernels":
        measure("abel-lightning `generate`, merged LoRA, static engine + CUDA graphs, 8 arms in one batch", arms)
    if args.paths == "all":
        measure("abel-lightning `generate`, merged LoRA, static engine eager", ours(engine="static", cuda_graphs=False))
    capture_s = decode_engine(merged).capture_seconds

    bandwidth, peak = copy_bandwidth(), matmul_tflops()
    prompt_lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    mean_context = sum(prompt_lengths) / len(prompt_lengths) + args.new_tokens / 2
    roofline = decode_roofline(merged, rows, mean_context, bandwidth, peak)
    limit = rows / roofline["step"]

    # The ratio is to the first path measured: plain generate, with --paths arms the one-setting engine run, with
    # --paths kernels the engine with PyTorch's ops.
    baseline = tokens / next(iter(seconds.values()))
    print("\n| path | questions/s | tokens/s | ratio | % of roofline | warm-up call s |")
    print("|---|---|---|---|---|---|")
    for name, s in seconds.items():
        print(
            f"| {name} | {args.questions / s:.2f} | {tokens / s:,.0f} | {tokens / s / baseline:.2f} "
            f"| {100 * tokens / s / limit:.0f}% | {warmup[name]:.1f} |"
        )
    bound = "compute" if roofline["compute"] > roofline["weights"] else "memory"
    matmul = max(roofline["weights"], roofline["compute"])
    print(
        f"\n{rows} rows x {args.new_tokens} new tokens, prompts of {args.prompt_tokens} tokens; roofline "
        f"{limit:,.0f} tokens/s = {rows} rows / ({1e3 * matmul:.2f} ms of matrix products, bound by "
        f"{bound} + {1e3 * roofline['attention']:.2f} ms reading the cache in use at a mean context of "
        f"{mean_context:.0f} tokens) a step; copy {bandwidth / 1e12:.2f} TB/s (device-to-device, 1 GiB, read + "
        f"write), bf16 matmul {peak:.0f} TFLOP/s, both measured now; graph capture {capture_s:.1f} s (in the "
        f"warm-up call, not timed); peak memory {gib(torch.cuda.max_memory_allocated()):.1f} GiB; "
        f"{torch.cuda.get_device_name()}"
    )


if __name__ == "__main__":
    main()
