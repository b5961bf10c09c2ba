"""Where the GPU time of a rollout decode step and of a DPO step goes, measured with the PyTorch profiler: the kernel
time per step by kind (matrix products, attention, copies and casts, the rest), what each kind achieves (bytes/s
for decoding, which is bound by memory; FLOP/s for training, which is bound by compute), and the share of the wall
time no kernel runs (launch and host overhead).

    python bench/gpu_profile.py decode --model mistral-7b-random --rows 256
    python bench/gpu_profile.py dpo --model mistral-7b-random --batch-size 2

decode: the engine eagerly (kernel by kernel; a CUDA graph runs the same kernels), ``--steps`` decode steps measured
as the difference of two calls that share the prefill, so the prefill cancels out; the wall time per step is that of
the CUDA-graph engine, measured the same way. dpo: DPOModule through Lightning's Trainer (bf16-mixed), profiling two
steps after three of warm-up.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/x.py` puts bench/ on sys.path, not the checkout: make `bench` importable from the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.models import gib, materialize, matmul_tflops, training_flop  # noqa: E402

KINDS = ("matmul", "attention", "copy/cast", "other")


def kind(kernel: str) -> str:
    name = kernel.lower()
    if any(k in name for k in ("fmha", "flash", "attention", "attn")):
        return "attention"
    if any(k in name for k in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas")):
        return "matmul"
    if any(k in name for k in ("copy", "cast", "convert")):
        return "copy/cast"
    return "other"


def kernel_seconds(run) -> tuple[dict[str, float], dict[str, float]]:
    """GPU kernel seconds of ``run()`` by kind, and the ten costliest kernels."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return kernel_times(prof)


def kernel_times(prof) -> tuple[dict[str, float], dict[str, float]]:
    """GPU kernel seconds a finished profile recorded, by kind, and its ten costliest kernels."""
    by_kind: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        seconds = event.self_device_time_total / 1e6
        if seconds > 0:
            by_kind[kind(event.key)] += seconds
            by_kernel[event.key] += seconds
    return by_kind, dict(sorted(by_kernel.items(), key=lambda kv: -kv[1])[:10])


def print_table(
    per_step: dict[str, float], wall: float, work: dict[str, str], top: dict[str, float], steps: int
) -> None:
    print("\n| kernels | ms/step | share of wall | achieves |\n|---|---|---|---|")
    for name in KINDS:
        print(
            f"| {name} | {1e3 * per_step.get(name, 0):.2f} | {per_step.get(name, 0) / wall:.0%} "
            f"| {work.get(name, '')} |"
        )
    idle = wall - sum(per_step.values())
    print(f"| no kernel running | {1e3 * idle:.2f} | {idle / wall:.0%} | |")
    print(f"| wall | {1e3 * wall:.2f} | 100% | |")
    print("\ncostliest kernels (ms/step):")
    for name, seconds in top.items():
        print(f"  {1e3 * seconds / steps:8.3f}  {kind(name):10s} {name[:110]}")


def decode(args) -> None:
    from peft import get_peft_model

    from abel_lightning.models import decode_engine as engine_module
    from abel_lightning.models.generation import SamplingSettings, generate
    from abel_lightning.models.loading import LoraSettings, load_base, load_tokenizer
    from bench.models import copy_bandwidth, decode_bytes, decode_roofline
    from bench.rollout import prompts_of, timed

    engine_module.KV_BUCKET = args.kv_bucket
    path = materialize(args.model)
    tokenizer = load_tokenizer(path)
    model = get_peft_model(load_base(path, "bfloat16").cuda(), LoraSettings().to_peft()).eval().merge_and_unload()
    engine = engine_module.decode_engine(model)
    engine.kernels = args.kernels
    split_kv = engine.uses_triton(torch.device("cuda"))
    questions = args.rows // args.samples
    prompts = prompts_of(tokenizer, questions, args.prompt_tokens)
    width = max(len(ids) for ids in tokenizer(prompts)["input_ids"])

    def call(new_tokens: int, graphs: bool):
        settings = SamplingSettings(
            temperature=0.7,
            top_p=0.95,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            engine="static",
            cuda_graphs=graphs,
        )
        return lambda: generate(model, tokenizer, prompts, settings, args.samples)

    short, long = args.skip, args.skip + args.steps
    for graphs in (True, False):  # warm-up: capture the graphs, pick the kernels
        call(long, graphs)()
    wall = (timed(call(long, True)) - timed(call(short, True))) / args.steps
    eager_wall = (timed(call(long, False)) - timed(call(short, False))) / args.steps
    long_kinds, top = kernel_seconds(call(long, False))
    short_kinds, _ = kernel_seconds(call(short, False))
    per_step = {k: (long_kinds.get(k, 0) - short_kinds.get(k, 0)) / args.steps for k in KINDS}

    weight_bytes, slot_bytes = decode_bytes(model)
    slots = range(width + short - 1, width + long - 1)  # the cache slot each measured step writes
    context = sum(s + 1 for s in slots) / len(slots)
    # Slots attention reads a row: SDPA its whole bucket; split-KV those in use (from the prompt's first block).
    bucket = args.kv_bucket
    read = context if split_kv else sum((s // bucket + 1) * bucket for s in slots) / len(slots)
    bandwidth, peak = copy_bandwidth(), matmul_tflops()
    kv_bytes = slot_bytes * args.rows * read
    roofline = decode_roofline(model, args.rows, context, bandwidth, peak)
    work = {
        "matmul": f"{weight_bytes / per_step['matmul'] / 1e12:.2f} TB/s reading {weight_bytes / 1e9:.1f} GB of weights",
        "attention": f"{kv_bytes / per_step['attention'] / 1e12:.2f} TB/s reading {kv_bytes / 1e9:.1f} GB of KV "
        f"({read:.0f} slots a row, {context:.0f} in use)",
    }
    print(
        f"\ndecode step, {args.rows} rows, context {context:.0f} tokens on average, attention "
        f"{'split-KV (Triton)' if split_kv else f'SDPA over KV buckets of {args.kv_bucket}'}; "
        f"device-to-device copy {bandwidth / 1e12:.2f} TB/s; {torch.cuda.get_device_name()}"
    )
    print_table(per_step, wall, work, top, long)
    print(
        f"\nroofline {1e3 * roofline['step']:.2f} ms/step: matrix products "
        f"{1e3 * max(roofline['weights'], roofline['compute']):.2f} ms (weights at the copy rate "
        f"{1e3 * roofline['weights']:.2f}, FLOPs at {peak:.0f} TFLOP/s {1e3 * roofline['compute']:.2f}) + the cache in "
        f"use {1e3 * roofline['attention']:.2f} ms; CUDA-graph engine at {roofline['step'] / wall:.0%} of it "
        f"({args.rows / wall:,.0f} tokens/s); eager {1e3 * eager_wall:.2f} ms/step"
    )


def dpo(args) -> None:
    import lightning as L

    from abel_lightning.data.preferences import PreferenceDataModule
    from abel_lightning.jsonl import write_jsonl_atomic
    from abel_lightning.models.loading import load_tokenizer
    from abel_lightning.modules.dpo import DPOModule
    from bench.dpo_step import synthetic_pairs

    class Profiled(L.Callback):
        """Profiles batches ``first`` to ``first + count - 1``."""

        def __init__(self, first: int, count: int):
            self.first, self.count = first, count

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == self.first:
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CUDA]).__enter__()
                self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == self.first + self.count - 1:
                torch.cuda.synchronize()
                self.wall = time.perf_counter() - self.started
                self.prof.__exit__(None, None, None)

    work = Path(tempfile.mkdtemp())
    path = materialize(args.model)
    pairs = work / "pairs.jsonl"
    steps, profiled = 5, 2
    write_jsonl_atomic(pairs, synthetic_pairs(load_tokenizer(path), steps * args.batch_size, args.prompt_tokens, 256))
    module = DPOModule(model=path, adapter=None, gradient_checkpointing=False)
    data = PreferenceDataModule(pairs=str(pairs), rollouts=None, batch_size=args.batch_size, val_fraction=0.0)
    callback = Profiled(first=steps - profiled, count=profiled)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[callback],
    )
    trainer.fit(module, data)
    by_kind, top = kernel_times(callback.prof)
    per_step = {k: v / profiled for k, v in by_kind.items()}
    wall = callback.wall / profiled
    tokens = 2 * args.batch_size * (args.prompt_tokens + 256)
    flop = training_flop(module.policy, tokens)
    peak = matmul_tflops()
    work = {
        "matmul": f"{flop / per_step['matmul'] / 1e12:.0f} TFLOP/s of the 6·N·tokens count ({peak:.0f} measured peak)"
    }
    print(
        f"\nDPO step, {args.batch_size} pairs ({tokens} tokens), bf16-mixed, no gradient checkpointing: "
        f"MFU {flop / wall / 1e12 / peak:.0%}; peak memory {gib(torch.cuda.max_memory_allocated()):.1f} GiB; "
        f"{torch.cuda.get_device_name()}"
    )
    print_table(per_step, wall, work, top, profiled)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("decode")
    p.add_argument("--model", default="mistral-7b-random")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=160)
    p.add_argument("--skip", type=int, default=65, help="steps before the measured ones (prefill included)")
    p.add_argument(
        "--steps",
        type=int,
        default=128,
        help="measured steps; the defaults center them on the rollout bench's mean context (160 + 256 / 2 tokens)",
    )
    p.add_argument("--kv-bucket", type=int, default=128, help="with SDPA: slots a step's attention reads, rounded up")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto", help="DecodeEngine.kernels")
    p.set_defaults(fn=decode)
    p = sub.add_parser("dpo")
    p.add_argument("--model", default="mistral-7b-random")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=160)
    p.set_defaults(fn=dpo)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
