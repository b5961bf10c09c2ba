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


def random_adapter(base: str, out: str) -> str:
    """A LoRA adapter (the project's default settings) for the local model ``base`` with random, non-zero B, saved as
    a PEFT folder at ``out``: it costs what a trained adapter costs, for the benchmarks that load one."""
    from peft import get_peft_model

    from abel_lightning.models.loading import LoraSettings, load_base
    from abel_lightning.models.tiny import randomize_lora

    model = get_peft_model(
        load_base(base, "bfloat16").to("cuda" if torch.cuda.is_available() else "cpu"), LoraSettings().to_peft()
    )
    randomize_lora(model, 1e-3).save_pretrained(out)
    return out


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


def copy_bandwidth(n_bytes: int = 2**30, repeats: int = 20) -> float:
    """Bytes per second a device-to-device copy of ``n_bytes`` moves, counting the read and the write."""
    source = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        target.copy_(source)
    end.record()
    end.synchronize()
    return 2 * n_bytes * repeats / (start.elapsed_time(end) / 1000)


def decode_bytes(model) -> tuple[int, int]:
    """What a decode step reads: the weights' bytes, and the bytes of one cache slot (keys and values of every layer,
    bf16) of one row."""
    config = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return weight_bytes, 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2


def decode_roofline(model, rows: int, context: float, bandwidth: float, peak_tflops: float) -> dict[str, float]:
    """The fastest a decode step of ``rows`` rows at a mean ``context`` can run (issue 17's roofline), in seconds.

    The matrix products read every weight once and do 2 x parameters FLOP a row, so they take the larger of
    ``weight bytes / bandwidth`` (few rows: bound by memory) and ``2 x parameters x rows / peak`` (many rows: bound by
    compute); attention reads each row's cache in use, ``rows x context x slot bytes / bandwidth``. The two add: they
    run one after the other in each layer."""
    weight_bytes, slot_bytes = decode_bytes(model)
    parameters = sum(p.numel() for p in model.parameters())
    weights = weight_bytes / bandwidth
    compute = 2 * parameters * rows / (peak_tflops * 1e12)
    attention = rows * context * slot_bytes / bandwidth
    return {"weights": weights, "compute": compute, "attention": attention, "step": max(weights, compute) + attention}


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
