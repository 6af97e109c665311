"""Backward kernel: deterministic segmented row sums of grad_out into a table gradient.

Both table gradients of ``prompt_concat`` are the same reduction: table row r receives the sum of
grad_out[b, col_start + c, :] over every (b, c) whose index is r. The launcher sorts the flattened
indices (stable sort, on device, no host sync) and finds each row's segment with ``searchsorted``;
the kernel then sums each segment in a fixed order, BLOCK_K entries at a time with a tree reduction,
accumulating in float32. No atomics: the same inputs give bit-identical gradients on every run.
Ids outside [0, num_rows) fall in no segment and are ignored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .address import row_offset
from .scale import scale_arguments


@triton.jit
def _segment_rows_sum_kernel(
    out_ptr,
    grad_ptr,
    perm_ptr,
    seg_ptr,
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
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """
    out_ptr:  [R, D] gradient table (float32/float16/bfloat16), unit stride on D.
    grad_ptr: [B, T+L, D] upstream gradient, any strides and float dtype.
    perm_ptr: [N] int64, positions k = b * cols + c of the flattened indices, sorted by index value.
    seg_ptr:  [R + 1] int64, row r's entries are perm[seg[r]:seg[r+1]].
    cols:     columns per batch row in the indexed region (T or L); col_start: its first column.
    scale:    float32 multiplier applied to the sum (SCALE_MODE 1); scale_ptr: [1] float tensor
              holding it instead (SCALE_MODE 2). zero_row: a row forced to 0 (padding_idx), or -1.
    """
    r = tl.program_id(0).to(tl.int64)
    cols_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = cols_d < dim
    start = tl.load(seg_ptr + r)
    end = tl.load(seg_ptr + r + 1)
    end = tl.where(r == zero_row, start, end)  # the padding row's sum is never needed: skip it
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < end
        pos = tl.load(perm_ptr + ks, mask=k_ok, other=0)
        b = pos // cols
        c = pos - b * cols + col_start
        src = row_offset(b, stride_grad_b) + row_offset(c, stride_grad_s)
        g = tl.load(
            grad_ptr + src[:, None] + cols_d[None, :] * stride_grad_d,
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(g, axis=0)
    if SCALE_MODE == 1:
        acc = acc * scale
    elif SCALE_MODE == 2:
        acc = acc * tl.load(scale_ptr).to(tl.float32)
    keep = (tl.zeros([BLOCK_D], dtype=tl.int64) + r) != zero_row
    acc = tl.where(keep, acc, 0.0)
    tl.store(out_ptr + row_offset(r, stride_out_r) + cols_d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def segment_rows_sum(
    grad_out: torch.Tensor,
    col_start: int,
    index: torch.Tensor,
    num_rows: int,
    out_dtype: torch.dtype,
    scale: float | torch.Tensor | None = None,
    zero_row: int | None = None,
) -> torch.Tensor:
    """Return ``[num_rows, D]`` in ``out_dtype``: row r = scale * sum of grad_out[b, col_start + c]
    over all (b, c) with ``index[b, c] == r``; row ``zero_row`` is 0.

    Args:
        grad_out: [B, S, D] float tensor, any strides.
        col_start: first column of grad_out that ``index`` covers.
        index: [B, C] int64/int32 (a [C] index shared by every batch row must be expanded first).
        num_rows: R, the table's row count.
    """
    batch, cols = index.shape
    dim = grad_out.shape[2]
    out = torch.empty(num_rows, dim, dtype=out_dtype, device=grad_out.device)
    if num_rows == 0 or dim == 0:
        return out
    flat = index.reshape(-1).long()
    sorted_index, perm = torch.sort(flat, stable=True)
    bounds = torch.arange(num_rows + 1, device=flat.device, dtype=torch.int64)
    seg = torch.searchsorted(sorted_index, bounds)  # [R + 1]; ids < 0 or >= R fall outside
    interpret = grad_out.device.type == "cpu"
    block_d = min(triton.next_power_of_2(dim), 4096 if interpret else 512)
    block_k = 32 if interpret else 16
    grid = (num_rows, triton.cdiv(dim, block_d))
    scale_mode, scale_float, scale_tensor = scale_arguments(scale, grad_out)
    _segment_rows_sum_kernel[grid](
        out,
        grad_out,
        perm,
        seg,
        max(cols, 1),
        col_start,
        dim,
        scale_float,
        scale_tensor,
        -1 if zero_row is None else int(zero_row),
        out.stride(0),
        grad_out.stride(0),
        grad_out.stride(1),
        grad_out.stride(2),
        SCALE_MODE=scale_mode,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out
