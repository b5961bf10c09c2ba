"""The decode step's Triton kernels against what they replace: softmax attention written out in float64, Llama's
rotary embedding and RMSNorm. Without a GPU the kernels run in Triton's interpreter (``conftest.py``), so these run in
CI as well as on the GPU."""

from __future__ import annotations

import pytest
import torch

from abel_lightning.compat import apply_rotary_pos_emb
from abel_lightning.models.decode_kernels import (
    BLOCK_N,
    add_rms_norm,
    kernels_supported,
    rotate_and_store,
    split_kv_attention,
    triton,
)

pytestmark = pytest.mark.skipif(triton is None, reason="needs Triton (PyTorch's CUDA wheels bring it)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bfloat16 where it matters, on the GPU; Triton's interpreter computes bfloat16 dots wrongly on the CPU.
DTYPES = [torch.float32, torch.bfloat16 if DEVICE == "cuda" else torch.float16]


def reference(query, keys, values, key_mask, slot: int, scale: float) -> torch.Tensor:
    """Softmax attention in float64 of each row's query heads over its key head's seen slots up to ``slot``."""
    groups = query.shape[1] // keys.shape[1]
    keys = keys.double().repeat_interleave(groups, 1)[:, :, : slot + 1]
    values = values.double().repeat_interleave(groups, 1)[:, :, : slot + 1]
    scores = torch.einsum("bhd,bhnd->bhn", query.double(), keys) * scale
    scores = scores.masked_fill(~key_mask[:, None, : slot + 1], float("-inf"))
    return torch.einsum("bhn,bhnd->bhd", scores.softmax(-1), values)


def cache(rows: int, heads: int, key_heads: int, capacity: int, dim: int, dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, heads, dim, generator=generator)
    keys = torch.randn(rows, key_heads, capacity, dim, generator=generator)
    values = torch.randn(rows, key_heads, capacity, dim, generator=generator)
    return [t.to(DEVICE, dtype) for t in (query, keys, values)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 2, 8])
@pytest.mark.parametrize("heads, key_heads, dim", [(8, 2, 32), (4, 4, 16), (12, 3, 64)])
def test_matches_softmax_attention_over_each_rows_seen_keys(dtype, splits, heads, key_heads, dim):
    rows, capacity, slot = 3, 3 * BLOCK_N + 8, 2 * BLOCK_N + 20
    query, keys, values = cache(rows, heads, key_heads, capacity, dim, dtype, seed=splits)
    # Left padding of different lengths (one longer than a block), a hole inside a row, nothing seen after `slot`.
    first = torch.tensor([0, 5, BLOCK_N + 3], device=DEVICE)
    key_mask = torch.arange(capacity, device=DEVICE)[None, :] >= first[:, None]
    key_mask[:, slot + 1 :] = False
    key_mask[0, 7] = False
    scale = dim**-0.5

    out = split_kv_attention(query, keys, values, key_mask, first, torch.tensor([slot], device=DEVICE), scale, splits)

    assert out.shape == query.shape and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    expected = reference(query, keys, values, key_mask, slot, scale)
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=0)


def test_reads_no_slot_before_the_rows_first_block_or_after_the_slot():
    """NaN in the slots it must not read (the cache past this step, and whole blocks of a row's left padding): the
    output stays finite and exact, so the kernel reads each row's slots in use and not the whole cache."""
    rows, heads, key_heads, dim, capacity, slot = 2, 4, 2, 16, 4 * BLOCK_N, 2 * BLOCK_N + 9
    query, keys, values = cache(rows, heads, key_heads, capacity, dim, torch.float32, seed=0)
    first = torch.tensor([3, BLOCK_N + 1], device=DEVICE)
    key_mask = (torch.arange(capacity, device=DEVICE)[None, :] >= first[:, None]) & (
        torch.arange(capacity, device=DEVICE)[None, :] <= slot
    )
    expected = reference(query, keys, values, key_mask, slot, 0.25)
    for cached in (keys, values):
        cached[:, :, slot + 1 :] = float("nan")
        cached[1, :, :BLOCK_N] = float("nan")  # row 1's first block is all padding

    out = split_kv_attention(query, keys, values, key_mask, first, torch.tensor([slot], device=DEVICE), 0.25, 4)

    assert out.isfinite().all()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotate_and_store_is_llamas_rotary_embedding_and_writes_only_the_slot(dtype):
    rows, heads, key_heads, dim, capacity, slot = 3, 8, 2, 32, 20, 7
    query, keys, values = cache(rows, heads, key_heads, 1, dim, dtype, seed=1)
    keys, values = keys[:, :, 0], values[:, :, 0]  # [B, G, D]
    angles = torch.rand(rows, 1, dim // 2, device=DEVICE) * 6.3
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    key_cache = torch.zeros(rows, key_heads, capacity, dim, dtype=dtype, device=DEVICE)
    value_cache = torch.zeros_like(key_cache)

    rotated = rotate_and_store(
        query, keys, values, cos[:, 0], sin[:, 0], key_cache, value_cache, torch.tensor([slot], device=DEVICE)
    )

    expected_query, expected_keys = apply_rotary_pos_emb(query[:, :, None], keys[:, :, None], cos, sin)
    # Ours rounds once, from float32; Llama's rounds each product and the sum: two units in the last place apart.
    tolerance = {"atol": 1e-6, "rtol": 0} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2 * 2**-7}
    torch.testing.assert_close(rotated, expected_query[:, :, 0], **tolerance)
    torch.testing.assert_close(key_cache[:, :, slot], expected_keys[:, :, 0], **tolerance)
    assert torch.equal(value_cache[:, :, slot], values)
    others = torch.arange(capacity, device=DEVICE) != slot
    assert not key_cache[:, :, others].any() and not value_cache[:, :, others].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_is_the_residual_add_then_llamas_rmsnorm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    size = 96  # not a power of two: the kernel's block masks the tail
    generator = torch.Generator().manual_seed(3)
    hidden, delta = (torch.randn(5, 1, size, generator=generator).to(DEVICE, dtype) for _ in range(2))
    norm = LlamaRMSNorm(size, eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(size, generator=generator) + 0.5)

    summed, normed = add_rms_norm(hidden, delta, norm.weight, norm.variance_epsilon)

    assert summed.shape == normed.shape == hidden.shape and normed.dtype == dtype
    assert torch.equal(summed, hidden + delta)  # one rounding of the sum, as PyTorch's add
    with torch.no_grad():
        expected = norm(hidden + delta)
    # The rsqrt may differ in its last bit; in bfloat16 that can move a rounding by one unit (2^-7 relative).
    torch.testing.assert_close(normed, expected, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-2)


def test_supported_shapes():
    assert kernels_supported(128, 4) and kernels_supported(16, 1)
    assert not kernels_supported(8, 1)  # below tl.dot's 16
    assert not kernels_supported(96, 4)  # not a power of two
