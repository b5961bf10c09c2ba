"""The Triton kernels of the decode engine's step: attention of one new token per row over the static KV cache,
reading only the slots each row uses; the rotary embedding and cache write before it; the residual add and RMSNorm
around it.

``scaled_dot_product_attention`` over the cache reads every row's whole bucket of slots, left padding and unused tail
included (issue 17's profile: 353 slots read a row for 290 in use, at 2.3 TB/s). :func:`split_kv_attention` starts
each row at its first real key and stops at the slot just written, and splits that range over several programs when
rows alone would leave the GPU idle (flash-decoding): each program keeps a running softmax over its chunk, and a
second kernel merges the chunks by their log-sum-exp. The range's end is read on the device, so one launch serves
every step of a captured CUDA graph. The other two replace about a dozen and four small PyTorch kernels each, which at
decode sizes cost their launch more than their bytes.

With ``TRITON_INTERPRET=1`` in the environment before Triton is imported, the kernels run on CPU tensors in Triton's
interpreter: slow, but the same arithmetic, which is how the tests check them on a machine without a GPU. Without
Triton (PyTorch's CUDA wheels bring it, its CPU wheels do not) :func:`kernels_supported` is False and the engine
keeps PyTorch's ops.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # PyTorch's CPU wheels come without Triton
    triton = None

# Keys per inner iteration; also the alignment of each program's chunk.
BLOCK_N = 64
# The most chunks a row's keys are split into.
MAX_SPLITS = 16
# Programs per streaming multiprocessor to aim for when choosing how many chunks to split a row's keys into.
PROGRAMS_PER_SM = 4


def kernels_supported(head_dim: int, groups: int) -> bool:
    """Whether the kernels handle this attention shape: Triton's ``tl.dot`` and ``tl.arange`` want a power-of-two head
    dimension of at least 16, and the query heads of one key head fit one tile of at most 64 rows."""
    return triton is not None and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and groups <= 64


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


@_jit
def _split_kv_attention_chunk(
    query,
    keys,
    values,
    key_mask,
    first,
    slot,
    out,
    lse,
    stride_qr,
    stride_qh,
    stride_kr,
    stride_kg,
    stride_kn,
    stride_vr,
    stride_vg,
    stride_vn,
    stride_mr,
    stride_or,
    stride_oh,
    stride_os,
    stride_lr,
    stride_lh,
    scale,
    GROUPS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (row, key head, chunk): softmax attention of the key head's ``GROUPS`` query heads over the chunk's keys.
    Writes the chunk's normalised output and its log-sum-exp (-inf for a chunk that saw no key)."""
    row = tl.program_id(0)
    group = tl.program_id(1)
    split = tl.program_id(2)
    # Keys [base, end): base is the row's first real key rounded down to a block, end the slot written this step.
    base = tl.load(first + row) // BLOCK_N * BLOCK_N
    end = tl.load(slot) + 1
    chunk = tl.cdiv(tl.cdiv(end - base, SPLITS), BLOCK_N) * BLOCK_N
    lo = base + split * chunk
    hi = tl.minimum(lo + chunk, end)

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    heads = group * GROUPS + h
    q = tl.load(query + row * stride_qr + heads[:, None] * stride_qh + d[None, :], mask=(h < GROUPS)[:, None], other=0)
    key_rows = keys + row * stride_kr + group * stride_kg
    value_rows = values + row * stride_vr + group * stride_vg
    running_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        inside = n < hi
        seen = (tl.load(key_mask + row * stride_mr + n, mask=inside, other=0) != 0) & inside
        k = tl.load(key_rows + n[:, None] * stride_kn + d[None, :], mask=inside[:, None], other=0)
        scores = tl.where(seen[None, :], tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        # A head that has seen no key yet keeps -inf; shifting by 0 then keeps exp() at 0 instead of NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp(scores - shift[:, None])
        v = tl.load(value_rows + n[:, None] * stride_vn + d[None, :], mask=inside[:, None], other=0)
        rescale = tl.exp(running_max - shift)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        total = total * rescale + tl.sum(probs, 1)
        running_max = new_max

    empty = total == 0
    acc = acc / tl.where(empty, 1.0, total)[:, None]
    chunk_lse = tl.where(empty, float("-inf"), running_max + tl.log(tl.where(empty, 1.0, total)))
    heads_in = h < GROUPS
    tl.store(
        out + row * stride_or + heads[:, None] * stride_oh + split * stride_os + d[None, :], acc, mask=heads_in[:, None]
    )
    tl.store(lse + row * stride_lr + heads * stride_lh + split, chunk_lse, mask=heads_in)


@_jit
def _split_kv_attention_merge(
    partial,
    lse,
    out,
    stride_pr,
    stride_ph,
    stride_ps,
    stride_lr,
    stride_lh,
    stride_or,
    stride_oh,
    SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """One (row, query head): the chunks' outputs weighted by exp(their log-sum-exp), i.e. softmax over all keys."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM)
    chunk_lse = tl.load(lse + row * stride_lr + head * stride_lh + s)
    # The slot written this step is always seen, so some chunk has a finite log-sum-exp.
    weights = tl.exp(chunk_lse - tl.max(chunk_lse, 0))
    chunks = tl.load(partial + row * stride_pr + head * stride_ph + s[:, None] * stride_ps + d[None, :])
    merged = tl.sum(chunks * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(out + row * stride_or + head * stride_oh + d, merged.to(out.dtype.element_ty))


@_jit
def _rotate_and_store_kernel(
    query,
    keys,
    values,
    cos,
    sin,
    key_cache,
    value_cache,
    slot,
    rotated,
    stride_qr,
    stride_qh,
    stride_kr,
    stride_kh,
    stride_vr,
    stride_vh,
    stride_cr,
    stride_sr,
    stride_kcr,
    stride_kch,
    stride_kcn,
    stride_vcr,
    stride_vch,
    stride_vcn,
    stride_rr,
    stride_rh,
    HEADS: tl.constexpr,
    HALF: tl.constexpr,
):
    """One (row, head) of heads + key heads: rotate a query head into ``rotated``, or rotate a key head and write it
    and its value head to the cache at ``slot``. Rotation as Llama's ``apply_rotary_pos_emb``:
    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = (-x2, x1)``, in float32."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, HALF)
    cos_1 = tl.load(cos + row * stride_cr + d).to(tl.float32)
    cos_2 = tl.load(cos + row * stride_cr + HALF + d).to(tl.float32)
    sin_1 = tl.load(sin + row * stride_sr + d).to(tl.float32)
    sin_2 = tl.load(sin + row * stride_sr + HALF + d).to(tl.float32)
    if head < HEADS:
        source = query + row * stride_qr + head * stride_qh
        target = rotated + row * stride_rr + head * stride_rh
    else:
        at = tl.load(slot)
        source = keys + row * stride_kr + (head - HEADS) * stride_kh
        target = key_cache + row * stride_kcr + (head - HEADS) * stride_kch + at * stride_kcn
        value = tl.load(values + row * stride_vr + (head - HEADS) * stride_vh + tl.arange(0, 2 * HALF))
        tl.store(
            value_cache + row * stride_vcr + (head - HEADS) * stride_vch + at * stride_vcn + tl.arange(0, 2 * HALF),
            value,
        )
    x_1 = tl.load(source + d).to(tl.float32)
    x_2 = tl.load(source + HALF + d).to(tl.float32)
    tl.store(target + d, (x_1 * cos_1 - x_2 * sin_1).to(target.dtype.element_ty))
    tl.store(target + HALF + d, (x_2 * cos_2 + x_1 * sin_2).to(target.dtype.element_ty))


def rotate_and_store(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    cos: Tensor,
    sin: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slot: Tensor,
) -> Tensor:
    """A decode step's rotary embedding and cache write in one kernel (eager PyTorch spends about a dozen small ones).

    ``query`` [B, H, D], ``keys``/``values`` [B, G, D] (unit stride on D), ``cos``/``sin`` [B, D] (the rotary
    module's, at each row's position); ``key_cache``/``value_cache`` [B, G, C, D] receive the rotated keys and the
    values at ``slot`` [1]. Returns the rotated query [B, H, D].
    """
    rows, heads, head_dim = query.shape
    rotated = torch.empty_like(query)
    _rotate_and_store_kernel[(rows, heads + keys.shape[1])](
        query,
        keys,
        values,
        cos,
        sin,
        key_cache,
        value_cache,
        slot,
        rotated,
        query.stride(0),
        query.stride(1),
        keys.stride(0),
        keys.stride(1),
        values.stride(0),
        values.stride(1),
        cos.stride(0),
        sin.stride(0),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        rotated.stride(0),
        rotated.stride(1),
        HEADS=heads,
        HALF=head_dim // 2,
    )
    return rotated


@_jit
def _add_rms_norm_kernel(
    hidden, delta, weight, summed, normed, stride_h, stride_d, stride_s, stride_n, size, eps, BLOCK: tl.constexpr
):
    """One row: ``summed = hidden + delta`` rounded to the hidden dtype, then ``weight * rms_norm(summed)`` with the
    normalised value rounded to that dtype before the weight multiplies it, as Llama's RMSNorm rounds."""
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    inside = c < size
    x = tl.load(hidden + row * stride_h + c, mask=inside, other=0).to(tl.float32)
    x += tl.load(delta + row * stride_d + c, mask=inside, other=0).to(tl.float32)
    x = x.to(summed.dtype.element_ty)
    tl.store(summed + row * stride_s + c, x, mask=inside)
    x = x.to(tl.float32)
    unit = (x * tl.rsqrt(tl.sum(x * x, 0) / size + eps)).to(summed.dtype.element_ty)
    w = tl.load(weight + c, mask=inside, other=0).to(tl.float32)
    tl.store(normed + row * stride_n + c, (w * unit.to(tl.float32)).to(normed.dtype.element_ty), mask=inside)


def add_rms_norm(hidden: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``hidden + delta`` and Llama's RMSNorm of it with ``weight``, in one kernel: ``hidden``/``delta`` [..., H]
    (same shape and dtype), ``weight`` [H]. Returns (the sum, its norm), both in ``hidden``'s dtype."""
    shape, size = hidden.shape, hidden.shape[-1]
    rows = hidden.numel() // size
    hidden, delta = hidden.reshape(rows, size), delta.reshape(rows, size)
    summed, normed = torch.empty_like(hidden), torch.empty_like(hidden)
    _add_rms_norm_kernel[(rows,)](
        hidden,
        delta,
        weight,
        summed,
        normed,
        hidden.stride(0),
        delta.stride(0),
        summed.stride(0),
        normed.stride(0),
        size,
        eps,
        BLOCK=triton.next_power_of_2(size),
    )
    return summed.view(shape), normed.view(shape)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def splits_for(rows: int, key_heads: int, device: torch.device) -> int:
    """How many chunks to split each row's keys into: enough that rows x key heads x chunks programs keep every
    multiprocessor busy, a power of two (the merge kernel's tile) and at most ``MAX_SPLITS``."""
    wanted = -(-PROGRAMS_PER_SM * _multiprocessors(device) // (rows * key_heads))
    splits = 1
    while splits < min(wanted, MAX_SPLITS):
        splits *= 2
    return splits


def split_kv_attention(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    key_mask: Tensor,
    first: Tensor,
    slot: Tensor,
    scale: float,
    splits: int | None = None,
) -> Tensor:
    """Attention of one query per row over a static cache, reading only keys ``first[r]`` to ``slot`` of row r.

    ``query`` [B, H, D]; ``keys``/``values`` [B, G, C, D] with H a multiple of G and a unit stride on D; ``key_mask``
    [B, C] (bool, True where a key is seen); ``first`` [B] (long, each row's first seen slot); ``slot`` [1] (long, the
    last slot to read, already written); ``splits``: chunks per row, a power of two (default :func:`splits_for`).
    Returns [B, H, D] in the query's dtype. Slots before ``first[r]`` (rounded down to a block) and after ``slot`` are
    never read.
    """
    rows, heads, head_dim = query.shape
    key_heads = keys.shape[1]
    groups = heads // key_heads
    splits = splits or splits_for(rows, key_heads, query.device)
    partial = torch.empty(rows, heads, splits, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(rows, heads, splits, dtype=torch.float32, device=query.device)
    mask = key_mask.view(torch.uint8)
    _split_kv_attention_chunk[(rows, key_heads, splits)](
        query,
        keys,
        values,
        mask,
        first,
        slot,
        partial,
        lse,
        query.stride(0),
        query.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        mask.stride(0),
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        lse.stride(0),
        lse.stride(1),
        scale,
        GROUPS=groups,
        BLOCK_H=max(16, triton.next_power_of_2(groups)),
        BLOCK_N=BLOCK_N,
        HEAD_DIM=head_dim,
        SPLITS=splits,
        # float32 stays float32 (Triton's default would multiply in TF32, as PyTorch's matmuls do not by default).
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    out = torch.empty_like(query)
    _split_kv_attention_merge[(rows, heads)](
        partial,
        lse,
        out,
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        SPLITS=splits,
        HEAD_DIM=head_dim,
    )
    return out
