"""Model names the benchmarks accept: a hub id or local folder, or ``mistral-7b-random`` (Mistral-7B's shape with
random weights, built on the GPU once and saved under /tmp so that every benchmark loads it through the project's
real loading code, quantization included)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

RANDOM = {"mistral-7b-random": "mistral-7b", "tiny-llama-random": "tiny-llama"}


def materialize(name: str, root: str = "/tmp/abel-bench-models") -> str:
    if name not in RANDOM:
        return name
    folder = Path(root) / name
    if (folder / "config.json").exists():
        return str(folder)
    from abel_lightning.models.tiny import build_random_model

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    build_random_model(RANDOM[name], folder, seed=0, dtype=torch.bfloat16, device=device)
    torch.cuda.empty_cache()
    print(f"built {name} in {time.perf_counter() - started:.0f} s at {folder}", flush=True)
    return str(folder)


def gib(n_bytes: int) -> float:
    return n_bytes / 2**30


def matmul_tflops(size: int = 8192, repeats: int = 20) -> float:
    """The bf16 matrix-product rate this GPU reaches (TFLOP/s), the denominator of MFU."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def training_flop(model, tokens: float) -> float:
    """FLOP of a training step over ``tokens`` as issue 7 counts them for MFU: 6 x the model's parameters per token."""
    return 6 * sum(p.numel() for p in model.parameters()) * tokens


def adapter_report(base: str, adapter: str, device: str) -> str:
    """Load ``adapter`` onto ``base`` with ``PeftModel.from_pretrained`` on one device, as a user would after training
    on several, and describe what loaded (a trained adapter has LoRA B matrices away from their zero start)."""
    from peft import PeftModel

    from abel_lightning.models.loading import load_base

    model = PeftModel.from_pretrained(load_base(base, "bfloat16").to(device), adapter)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    mean = torch.stack([p.float().abs().mean() for p in lora_b]).mean().item()
    return f"{adapter} loads on one device: {len(lora_b)} LoRA B matrices, mean |B| {mean:.2e}"
