"""Forward kernel: gather prompt rows and token rows into one [B, T+L, D] output, one pass.

Each program owns BLOCK_R consecutive output rows (flattened over B and T+L) and walks D in BLOCK_D
chunks. Row s < T of batch b comes from ``prompt_weight[prompt_indices[b, s]]``, row s >= T from
``word_weight[input_ids[b, s - T]] * embed_scale``. Both loads are masked to the rows that need them,
so every needed table row is read exactly once and every output element written exactly once.
Ids out of range are never dereferenced: their output rows are written as NaN (the launcher's callers
raise IndexError before the launch where the check costs no device sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .address import INTERPRETED, row_offset
from .launch import Launch
from .scale import scale_arguments

# Index modes for the prompt rows (constexpr): all rows in order, one [T] list, one [B, T] list.
PROMPT_ALL = 0
PROMPT_SHARED = 1
PROMPT_PER_BATCH = 2


@triton.jit
def _prompt_concat_fwd_kernel(
    out_ptr,
    ids_ptr,
    word_ptr,
    prompt_ptr,
    pidx_ptr,
    total_rows,
    seq_out,
    num_prompt,
    dim,
    num_word_rows,
    num_prompt_rows,
    embed_scale,
    scale_ptr,
    stride_out_b,
    stride_out_s,
    stride_ids_b,
    stride_ids_l,
    stride_word_v,
    stride_word_d,
    stride_prompt_p,
    stride_prompt_d,
    stride_pidx_b,
    stride_pidx_t,
    PROMPT_MODE: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """
    out_ptr:    [B, T+L, D] output, dtype of word_weight, unit stride on D.
    ids_ptr:    [B, L] int64 or int32 token ids.
    word_ptr:   [V, D] float32/float16/bfloat16 word table.
    prompt_ptr: [P, D] float32/float16/bfloat16 prompt table.
    pidx_ptr:   [T] or [B, T] int64/int32 prompt indices (unused when PROMPT_MODE == PROMPT_ALL).
    total_rows: B * (T+L);  seq_out: T+L;  num_prompt: T;  dim: D.
    num_word_rows, num_prompt_rows: V and P, the bounds for the masked loads.
    embed_scale: float32 multiplier for token rows (SCALE_MODE == SCALE_FLOAT).
    scale_ptr:  [1] float tensor holding the multiplier (SCALE_MODE == SCALE_TENSOR), read on device.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # [BLOCK_R] flat output rows, int64
    row_ok = rows < total_rows
    b = rows // seq_out
    s = rows - b * seq_out
    is_prompt = row_ok & (s < num_prompt)
    is_token = row_ok & (s >= num_prompt)

    # Which table row each output row reads.
    if PROMPT_MODE == 0:
        prompt_row = s
    elif PROMPT_MODE == 1:
        prompt_row = tl.load(pidx_ptr + s * stride_pidx_t, mask=is_prompt, other=0).to(tl.int64)
    else:
        prompt_row = tl.load(pidx_ptr + b * stride_pidx_b + s * stride_pidx_t, mask=is_prompt, other=0).to(
            tl.int64
        )
    token_col = tl.where(is_token, s - num_prompt, 0)
    word_row = tl.load(ids_ptr + b * stride_ids_b + token_col * stride_ids_l, mask=is_token, other=0).to(
        tl.int64
    )
    prompt_ok = is_prompt & (prompt_row >= 0) & (prompt_row < num_prompt_rows)
    word_ok = is_token & (word_row >= 0) & (word_row < num_word_rows)
    bad_row = (is_prompt & ~prompt_ok) | (is_token & ~word_ok)

    prompt_base = row_offset(prompt_row, stride_prompt_p)
    word_base = row_offset(word_row, stride_word_v)
    out_base = row_offset(b, stride_out_b) + row_offset(s, stride_out_s)
    if SCALE_MODE == 1:
        scale = embed_scale
    elif SCALE_MODE == 2:
        scale = tl.load(scale_ptr).to(tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)  # int64: a column stride can be large too
        col_ok = cols < dim
        p = tl.load(
            prompt_ptr + prompt_base[:, None] + cols[None, :] * stride_prompt_d,
            mask=prompt_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        w = tl.load(
            word_ptr + word_base[:, None] + cols[None, :] * stride_word_d,
            mask=word_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if SCALE_MODE != 0:
            w = w * scale
        val = tl.where(is_prompt[:, None], p, w)
        val = tl.where(bad_row[:, None], float("nan"), val)
        tl.store(
            out_ptr + out_base[:, None] + cols[None, :],
            val.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )


def forward_blocks(dim: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for rows of ``dim`` elements: about 2K elements a tile on GPU
    (8 per thread at 8 warps: two 128-bit accesses per table; a 4K tile at 8 warps spills on sm_80,
    ``bench/kernel_report.py`` shows it), 16K in the interpreter (which pays per program)."""
    block_d = min(triton.next_power_of_2(max(dim, 1)), 1024 if not interpret else 4096)
    tile = 16384 if interpret else 2048
    block_r = max(1, min(tile // block_d, 64))
    return block_r, block_d, _warps(block_r * block_d)


def _warps(tile: int) -> int:
    """num_warps for a tile of ``tile`` elements: 8 from 2K elements up, else 4."""
    return 4 if tile < 2048 else 8


def forward_launch(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    prompt_weight: torch.Tensor,
    prompt_indices: torch.Tensor | None,
    embed_scale: float | torch.Tensor | None,
    out: torch.Tensor,
    *,
    interpret: bool = INTERPRETED,
    block_r: int | None = None,
    block_d: int | None = None,
) -> Launch:
    """The one launch that fills ``out`` [B, T+L, D]; arguments as in ``prompt_concat_forward``.

    ``interpret``: choose blocks for Triton's interpreter (default: how the kernels were defined);
    ``bench/kernel_report.py`` passes False to plan GPU launches on meta tensors.
    ``block_r`` / ``block_d``: override the block choice (tests use small blocks so that the D loop
    runs more than once); ``num_warps`` follows the tile size.
    """
    batch, seq_out, dim = out.shape
    mode, num_prompt, pidx, stride_pidx_b, stride_pidx_t = _prompt_index_args(
        input_ids, prompt_weight, prompt_indices
    )
    total_rows = batch * seq_out
    auto_r, auto_d, num_warps = forward_blocks(dim, interpret)
    block_r, block_d = block_r or auto_r, block_d or auto_d
    if (block_r, block_d) != (auto_r, auto_d):
        num_warps = _warps(block_r * block_d)
    scale_mode, scale_float, scale_tensor = scale_arguments(embed_scale, word_weight)
    args = (
        out,
        input_ids,
        word_weight,
        prompt_weight,
        pidx,
        total_rows,
        seq_out,
        num_prompt,
        dim,
        word_weight.shape[0],
        prompt_weight.shape[0],
        scale_float,
        scale_tensor,
        out.stride(0),
        out.stride(1),
        input_ids.stride(0),
        input_ids.stride(1),
        word_weight.stride(0),
        word_weight.stride(1),
        prompt_weight.stride(0),
        prompt_weight.stride(1),
        stride_pidx_b,
        stride_pidx_t,
    )
    meta = dict(
        PROMPT_MODE=mode, SCALE_MODE=scale_mode, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps
    )
    return Launch(_prompt_concat_fwd_kernel, (triton.cdiv(total_rows, block_r),), args, meta)


def _prompt_index_args(input_ids, prompt_weight, prompt_indices):
    """(PROMPT_MODE, T, index tensor, its batch stride, its column stride)."""
    if prompt_indices is None:
        return PROMPT_ALL, prompt_weight.shape[0], input_ids, 0, 0  # placeholder pointer, never read
    if prompt_indices.dim() == 1:
        return PROMPT_SHARED, prompt_indices.shape[0], prompt_indices, 0, prompt_indices.stride(0)
    return PROMPT_PER_BATCH, prompt_indices.shape[1], prompt_indices, *prompt_indices.stride()


def prompt_concat_forward(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    prompt_weight: torch.Tensor,
    prompt_indices: torch.Tensor | None,
    embed_scale: float | torch.Tensor | None,
    out: torch.Tensor | None = None,
    *,
    block_r: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """Launch the forward kernel once. Returns a new contiguous [B, T+L, D] in ``word_weight.dtype``.

    Shapes and dtypes as in ``_prompt_concat_fwd_kernel``; any strides. Arguments are assumed checked
    (``fastprompt.ops.checks``); out-of-range ids yield NaN rows, never an out-of-bounds read.
    ``embed_scale``: None, a float, or a one-element float tensor on the tables' device (read by the
    kernel, no host sync); token rows are ``round(float32(row) * float32(scale))``.
    ``out``: write into this [B, T+L, D] tensor instead (unit stride on D, any other strides); the op
    never passes it, the int64-offset test does. ``block_r`` / ``block_d``: see ``forward_launch``.
    """
    batch, seq_len = input_ids.shape
    dim = word_weight.shape[1]
    num_prompt = prompt_weight.shape[0] if prompt_indices is None else prompt_indices.shape[-1]
    seq_out = num_prompt + seq_len
    if out is None:
        out = torch.empty(batch, seq_out, dim, dtype=word_weight.dtype, device=word_weight.device)
    elif (
        out.shape != (batch, seq_out, dim)
        or out.dtype != word_weight.dtype
        or (dim > 1 and out.stride(2) != 1)
    ):
        raise ValueError(
            f"out must be [{batch}, {seq_out}, {dim}] {word_weight.dtype} with unit stride on D, got "
            f"{tuple(out.shape)} {out.dtype} strides {out.stride()}"
        )
    if batch * seq_out == 0 or dim == 0:
        return out
    forward_launch(
        input_ids,
        word_weight,
        prompt_weight,
        prompt_indices,
        embed_scale,
        out,
        block_r=block_r,
        block_d=block_d,
    )()
    return out
