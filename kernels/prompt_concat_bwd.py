"""Backward kernels: deterministic row sums of grad_out into a table gradient, fp32 accumulation.

Both table gradients of ``prompt_concat`` are one reduction: table row r receives the sum of
grad_out[b, col_start + c, :] over every (b, c) whose index is r. No atomics anywhere: the same inputs
give bit-identical gradients on every run.

- ``batch_rows_sum``: the prompt gradient of ``prompt_indices=None`` (prompt tuning's case), where
  row t is the sum over the batch of grad_out[:, t]. ONE launch, no sort: program (t, d-block) sums
  the B rows BLOCK_B at a time with a tree reduction.
- ``segment_rows_sum``: any index ([B, C] ids, possibly repeated). The launcher sorts the flattened
  indices (stable, on device, no host sync) and finds each row's segment with ``searchsorted``; then
  two launches split the work by POSITION in the sorted order, so that a frequent id (a pad token
  without ``padding_idx``: up to B*L entries) is summed by many programs, never by one:
  1. ``_segment_chunk_kernel``: program c owns sorted positions [c*CHUNK, (c+1)*CHUNK) and walks the
     segments that meet them. A segment that lies wholly inside the chunk is written to its output
     row; a segment that crosses the chunk's start (slot 0) or only its end (slot 1) leaves a partial
     sum in ``partial[c, slot]``.
  2. ``_segment_finish_kernel``: program r writes the rows pass 1 did not: zero for an empty row, and
     for a row whose segment spans chunks c0 < c1, partial[c0, 1] + partial[c0+1..c1, 0], in order.
  CHUNK is about sqrt(N), so neither pass does more than ~sqrt(N) entries serially.
  Ids outside [0, num_rows) fall in no segment and are ignored.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .address import INTERPRETED, row_offset
from .launch import Launch
from .scale import scale_arguments


@triton.jit
def _scaled(acc, scale, scale_ptr, SCALE_MODE: tl.constexpr):
    """``acc`` times the token-row scale: none, a float argument, or a [1] tensor read on device."""
    if SCALE_MODE == 1:
        acc = acc * scale
    elif SCALE_MODE == 2:
        acc = acc * tl.load(scale_ptr).to(tl.float32)
    return acc


@triton.jit
def _batch_rows_sum_kernel(
    out_ptr,
    grad_ptr,
    batch,
    dim,
    stride_out_r,
    stride_grad_b,
    stride_grad_s,
    stride_grad_d,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """
    out_ptr:  [T, D] prompt gradient (float32/float16/bfloat16), unit stride on D.
    grad_ptr: [B, T+L, D] upstream gradient, any strides and float dtype; rows t < T are summed.
    """
    t = tl.program_id(0).to(tl.int64)
    cols_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = cols_d < dim
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for b0 in range(0, batch, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        src = row_offset(bs, stride_grad_b) + row_offset(t, stride_grad_s)
        g = tl.load(
            grad_ptr + src[:, None] + cols_d[None, :] * stride_grad_d,
            mask=(bs < batch)[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(g, axis=0)
    tl.store(out_ptr + row_offset(t, stride_out_r) + cols_d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _segment_sum(
    acc, grad_ptr, perm_ptr, lo, hi, cols, col_start, cols_d, d_ok, sb, ss, sd, BLOCK_K: tl.constexpr
):
    """``acc`` plus the sum of grad_out rows at sorted positions [lo, hi), BLOCK_K at a time, in order."""
    for k0 in range(lo, hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < hi
        pos = tl.load(perm_ptr + ks, mask=k_ok, other=0)
        b = pos // cols
        c = pos - b * cols + col_start
        src = row_offset(b, sb) + row_offset(c, ss)
        g = tl.load(
            grad_ptr + src[:, None] + cols_d[None, :] * sd,
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(g, axis=0)
    return acc


@triton.jit
def _segment_chunk_kernel(
    out_ptr,
    partial_ptr,
    grad_ptr,
    sorted_ptr,
    perm_ptr,
    seg_ptr,
    num_rows,
    cols,
    col_start,
    dim,
    scale,
    scale_ptr,
    zero_row,
    stride_out_r,
    stride_grad_b,
    stride_grad_s,
    stride_grad_d,
    SCALE_MODE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """
    out_ptr:     [R, D] gradient table (float32/float16/bfloat16), unit stride on D.
    partial_ptr: [C, 2, D] float32 partial sums of segments that cross a chunk boundary, contiguous.
    grad_ptr:    [B, S, D] upstream gradient, any strides and float dtype.
    sorted_ptr:  [N] int64 index values in sorted order; perm_ptr: [N] int64 their positions
                 k = b * cols + c in the flattened [B, cols] index.
    seg_ptr:     [R + 1] int64, row r's entries are at sorted positions seg[r]:seg[r+1].
    cols:        columns per batch row of the index (T or L); col_start: its first column in grad_out.
    scale:       float32 multiplier (SCALE_MODE 1); scale_ptr: [1] float tensor holding it (SCALE_MODE 2).
    zero_row:    a row forced to 0 (padding_idx), or -1.
    """
    c = tl.program_id(0).to(tl.int64)
    cols_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = cols_d < dim
    chunk_lo = c * CHUNK
    chunk_hi = chunk_lo + CHUNK
    pos = tl.maximum(chunk_lo, tl.load(seg_ptr))  # ids < 0 sort first and belong to no row
    end = tl.minimum(chunk_hi, tl.load(seg_ptr + num_rows))  # ids >= R sort last
    while pos < end:
        r = tl.load(sorted_ptr + pos)
        seg_lo = tl.load(seg_ptr + r)
        seg_hi = tl.load(seg_ptr + r + 1)
        hi = tl.minimum(seg_hi, end)
        stop = tl.where(r == zero_row, pos, hi)  # the padding row's sum is never needed: skip it
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc = _segment_sum(
            acc, grad_ptr, perm_ptr, pos, stop, cols, col_start, cols_d, d_ok,
            stride_grad_b, stride_grad_s, stride_grad_d, BLOCK_K,
        )  # fmt: skip
        if (seg_lo >= chunk_lo) & (seg_hi <= chunk_hi):  # wholly in this chunk: the row is done
            acc = _scaled(acc, scale, scale_ptr, SCALE_MODE)
            tl.store(
                out_ptr + row_offset(r, stride_out_r) + cols_d, acc.to(out_ptr.dtype.element_ty), mask=d_ok
            )
        else:  # slot 0: the segment began in an earlier chunk; slot 1: it only continues past this one
            slot = tl.where(seg_lo < chunk_lo, 0, 1).to(tl.int64)
            tl.store(partial_ptr + (c * 2 + slot) * dim + cols_d, acc, mask=d_ok)
        pos = hi


@triton.jit
def _segment_finish_kernel(
    out_ptr,
    partial_ptr,
    seg_ptr,
    dim,
    scale,
    scale_ptr,
    zero_row,
    stride_out_r,
    SCALE_MODE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """
    out_ptr, partial_ptr, seg_ptr, scale, scale_ptr, zero_row, stride_out_r: as in
    ``_segment_chunk_kernel``. Writes row r unless pass 1 already wrote it.
    """
    r = tl.program_id(0).to(tl.int64)
    cols_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = cols_d < dim
    seg_lo = tl.load(seg_ptr + r)
    seg_hi = tl.load(seg_ptr + r + 1)
    c0 = seg_lo // CHUNK
    c1 = (seg_hi - 1) // CHUNK
    out_row = out_ptr + row_offset(r, stride_out_r) + cols_d
    if (seg_hi <= seg_lo) | (r == zero_row):
        tl.store(out_row, tl.zeros([BLOCK_D], dtype=tl.float32).to(out_ptr.dtype.element_ty), mask=d_ok)
    elif c1 > c0:
        acc = tl.load(partial_ptr + (c0 * 2 + 1) * dim + cols_d, mask=d_ok, other=0.0)
        for k0 in range(c0 + 1, c1 + 1, BLOCK_C):
            ks = k0 + tl.arange(0, BLOCK_C).to(tl.int64)
            part = tl.load(
                partial_ptr + (ks * 2)[:, None] * dim + cols_d[None, :],
                mask=(ks <= c1)[:, None] & d_ok[None, :],
                other=0.0,
            )
            acc += tl.sum(part, axis=0)
        acc = _scaled(acc, scale, scale_ptr, SCALE_MODE)
        tl.store(out_row, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def backward_blocks(dim: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_D, num_warps) of the backward kernels: one D block in the interpreter, 512 on GPU."""
    return min(triton.next_power_of_2(max(dim, 1)), 4096 if interpret else 512), 4


def chunk_size(num_entries: int, block_k: int) -> int:
    """CHUNK for ``num_entries`` sorted entries: a power of two near sqrt(N), at least ``block_k``."""
    return max(block_k, triton.next_power_of_2(max(1, math.isqrt(max(num_entries, 1)))))


def batch_rows_launch(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    *,
    interpret: bool = INTERPRETED,
    block_b: int | None = None,
    block_d: int | None = None,
) -> Launch:
    """The one launch of ``batch_rows_sum`` into ``out`` [T, D]; overrides as in ``forward_launch``."""
    num_rows, dim = out.shape
    auto_d, num_warps = backward_blocks(dim, interpret)
    block_d = block_d or auto_d
    tile_rows = max(1, (16384 if interpret else 2048) // block_d)  # 16 fp32 a thread on GPU: no spills
    block_b = block_b or min(triton.next_power_of_2(max(grad_out.shape[0], 1)), tile_rows)
    args = (
        out, grad_out, grad_out.shape[0], dim, out.stride(0),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
    )  # fmt: skip
    meta = dict(BLOCK_B=block_b, BLOCK_D=block_d, num_warps=num_warps)
    return Launch(_batch_rows_sum_kernel, (num_rows, triton.cdiv(dim, block_d)), args, meta)


def batch_rows_sum(
    grad_out: torch.Tensor,
    num_rows: int,
    out_dtype: torch.dtype,
    *,
    block_b: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """Return ``[num_rows, D]`` in ``out_dtype``: row t = sum over b of grad_out[b, t] (fp32 sums).

    Args:
        grad_out: [B, S, D] float tensor, any strides, S >= num_rows.
        num_rows: T, the prompt table's rows (all of them, in order).
    """
    dim = grad_out.shape[2]
    out = torch.empty(num_rows, dim, dtype=out_dtype, device=grad_out.device)
    if num_rows == 0 or dim == 0:
        return out
    batch_rows_launch(grad_out, out, block_b=block_b, block_d=block_d)()
    return out


def segment_launches(
    grad_out: torch.Tensor,
    col_start: int,
    cols: int,
    sorted_index: torch.Tensor,
    perm: torch.Tensor,
    seg: torch.Tensor,
    out: torch.Tensor,
    scale: float | torch.Tensor | None = None,
    zero_row: int | None = None,
    *,
    interpret: bool = INTERPRETED,
    block_k: int | None = None,
    block_d: int | None = None,
    chunk: int | None = None,
) -> tuple[Launch, Launch]:
    """The two launches of ``segment_rows_sum`` (chunk pass, finish pass) and their partial buffer."""
    num_rows, dim = out.shape
    num_entries = sorted_index.shape[0]
    auto_d, num_warps = backward_blocks(dim, interpret)
    block_d = block_d or auto_d
    block_k = block_k or (32 if interpret else 8)  # GPU: [8, 512] tiles, 32 fp32 a thread
    chunk = chunk or chunk_size(num_entries, block_k)
    num_chunks = max(1, triton.cdiv(num_entries, chunk))
    partial = torch.empty(num_chunks, 2, dim, dtype=torch.float32, device=out.device)
    scale_mode, scale_float, scale_tensor = scale_arguments(scale, grad_out)
    zero = -1 if zero_row is None else int(zero_row)
    d_blocks = triton.cdiv(dim, block_d)
    chunk_args = (
        out, partial, grad_out, sorted_index, perm, seg, num_rows, max(cols, 1), col_start, dim,
        scale_float, scale_tensor, zero, out.stride(0),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
    )  # fmt: skip
    chunk_meta = dict(
        SCALE_MODE=scale_mode, CHUNK=chunk, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps
    )
    finish_args = (out, partial, seg, dim, scale_float, scale_tensor, zero, out.stride(0))
    block_c = min(triton.next_power_of_2(num_chunks), 8)
    finish_meta = dict(
        SCALE_MODE=scale_mode, CHUNK=chunk, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=num_warps
    )
    return (
        Launch(_segment_chunk_kernel, (num_chunks, d_blocks), chunk_args, chunk_meta),
        Launch(_segment_finish_kernel, (num_rows, d_blocks), finish_args, finish_meta),
    )


def segment_rows_sum(
    grad_out: torch.Tensor,
    col_start: int,
    index: torch.Tensor,
    num_rows: int,
    out_dtype: torch.dtype,
    scale: float | torch.Tensor | None = None,
    zero_row: int | None = None,
    *,
    block_k: int | None = None,
    block_d: int | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Return ``[num_rows, D]`` in ``out_dtype``: row r = scale * sum of grad_out[b, col_start + c]
    over all (b, c) with ``index[b, c] == r``; row ``zero_row`` is 0.

    Args:
        grad_out: [B, S, D] float tensor, any strides.
        col_start: first column of grad_out that ``index`` covers.
        index: [B, C] int64/int32 (a [C] index shared by every batch row must be expanded first).
        num_rows: R, the table's row count.
        block_k, block_d, chunk: override the block choice (tests: loops past their first iteration).
    """
    cols = index.shape[1]
    dim = grad_out.shape[2]
    out = torch.empty(num_rows, dim, dtype=out_dtype, device=grad_out.device)
    if num_rows == 0 or dim == 0:
        return out
    flat = index.reshape(-1).long()
    sorted_index, perm = torch.sort(flat, stable=True)
    bounds = torch.arange(num_rows + 1, device=flat.device, dtype=torch.int64)
    seg = torch.searchsorted(sorted_index, bounds)  # [R + 1]; ids < 0 or >= R fall outside
    launches = segment_launches(
        grad_out, col_start, cols, sorted_index, perm, seg, out, scale, zero_row,
        block_k=block_k, block_d=block_d, chunk=chunk,
    )  # fmt: skip
    for launch in launches:
        launch()
    return out
