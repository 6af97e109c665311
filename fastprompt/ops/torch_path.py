"""The pure-PyTorch implementation of the fused op (CPU, or wherever Triton cannot run).

Fused as far as eager PyTorch allows: the output is allocated once and written in place, so no
``[B, L, D]`` temporary and no ``cat``. Token rows are gathered by ``index_select(..., out=)``: one
call into the token rows when B=1; one call over the whole flattened output when the prompt is short
against the text (its positions take
word row 0 as a placeholder, then the prompt rows overwrite them: at most 1/9 extra writes, for one
parallel region instead of B), else one call per batch row (every element written once).
Shapes: B batch, L tokens, T prompt tokens, D embedding size, V vocabulary rows, P prompt-table rows.
"""

from __future__ import annotations

import torch


def _prompt_index_rows(prompt_indices: torch.Tensor | None, num_prompt_rows: int, device) -> torch.Tensor:
    """[T] int64 or [B, T] int64 indices; None means all prompt rows in order."""
    if prompt_indices is None:
        return torch.arange(num_prompt_rows, device=device)
    return prompt_indices.long()


def forward(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    prompt_weight: torch.Tensor,
    prompt_indices: torch.Tensor | None,
    embed_scale: float | torch.Tensor | None,
) -> torch.Tensor:
    """Return ``[B, T+L, D]`` in ``word_weight.dtype``.

    Args:
        input_ids: [B, L] int64/int32 token ids into ``word_weight``.
        word_weight: [V, D] float32/float16/bfloat16, any strides.
        prompt_weight: [P, D] float32/float16/bfloat16, any strides.
        prompt_indices: None (all P rows), [T] or [B, T] int64/int32 into ``prompt_weight``.
        embed_scale: None, a float, or a 0-dim float tensor on the tables' device: token rows are
            ``row * embed_scale`` exactly as PyTorch computes it (float32 math, one rounding).
    """
    batch, seq_len = input_ids.shape
    dim = word_weight.shape[1]
    num_prompt = prompt_weight.shape[0] if prompt_indices is None else prompt_indices.shape[-1]
    out = torch.empty(batch, num_prompt + seq_len, dim, dtype=word_weight.dtype, device=word_weight.device)
    if batch == 0:
        return out
    ids = input_ids.long()
    if batch == 1 and seq_len > 0:
        # One row: its token rows are contiguous in the output, one gather (or gather and scale).
        token_rows = out.view(num_prompt + seq_len, dim)[num_prompt:]
        if embed_scale is None:
            torch.index_select(word_weight, 0, ids.reshape(-1), out=token_rows)
        else:
            torch.mul(word_weight.index_select(0, ids.reshape(-1)), embed_scale, out=token_rows)
    elif seq_len > 0 and embed_scale is None and num_prompt * 8 <= seq_len:
        # One gather for all B*(T+L) output rows instead of B per-row calls (each its own ATen call
        # and parallel region): the T prompt positions of each row read word row 0 (a placeholder,
        # overwritten below). Taken only while that costs at most T/(T+L) <= 1/9 extra writes;
        # (bench/RESULTS.md has the measured figures of this path against peft at the target shape.)
        rows = ids.new_zeros(batch, num_prompt + seq_len)
        rows[:, num_prompt:] = ids
        torch.index_select(word_weight, 0, rows.view(-1), out=out.view(-1, dim))
    elif seq_len > 0:
        for b in range(batch):
            if embed_scale is None:
                torch.index_select(word_weight, 0, ids[b], out=out[b, num_prompt:])
            else:
                # Scaled: an [L, D] temporary per batch row, so the output is still written once.
                torch.mul(word_weight.index_select(0, ids[b]), embed_scale, out=out[b, num_prompt:])
    if num_prompt == 0:
        return out
    if prompt_indices is None:  # all rows in order: the table itself (copy_ broadcasts it over B)
        out[:, :num_prompt].copy_(prompt_weight)
    elif prompt_indices.dim() == 1:
        out[:, :num_prompt].copy_(prompt_weight.index_select(0, prompt_indices.long()))  # [T, D], read once
    else:
        indices = prompt_indices.long()
        for b in range(batch):
            if prompt_weight.dtype == word_weight.dtype:
                torch.index_select(prompt_weight, 0, indices[b], out=out[b, :num_prompt])
            else:
                out[b, :num_prompt].copy_(prompt_weight.index_select(0, indices[b]))
    return out


def prompt_grad(
    grad_out: torch.Tensor,
    prompt_indices: torch.Tensor | None,
    num_prompt_rows: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Gradient of ``prompt_weight``: [P, D] in ``dtype``, reduced from grad_out[:, :T] in float32.

    ``index_add_`` on CPU adds in a fixed order, so the result is bit-identical from run to run.
    Rows repeated in ``prompt_indices`` get the sum of their gradients.
    """
    batch, _, dim = grad_out.shape
    if prompt_indices is None and batch == 1:  # a sum of one: the rows themselves, in a fresh tensor
        return grad_out[0, :num_prompt_rows].to(dtype, copy=True)
    if prompt_indices is None and batch > 0 and num_prompt_rows > 0:
        # All rows in order (prompt tuning's case): the gradient is the batch sum itself, without the
        # zero fill and the scatter (a third of the backward's time at B=1, T=10, D=768).
        return grad_out[:, :num_prompt_rows].sum(0, dtype=torch.float32).to(dtype)
    indices = _prompt_index_rows(prompt_indices, num_prompt_rows, grad_out.device)
    num_prompt = indices.shape[-1]
    grad = torch.zeros(num_prompt_rows, dim, dtype=torch.float32, device=grad_out.device)
    if batch == 0 or num_prompt == 0:
        return grad.to(dtype)
    prompt_part = grad_out[:, :num_prompt]
    if indices.dim() == 1:
        summed = prompt_part.sum(0, dtype=torch.float32)  # [T, D]
        grad.index_put_((indices,), summed, accumulate=True)
    else:
        grad.index_put_((indices.reshape(-1),), prompt_part.reshape(-1, dim).float(), accumulate=True)
    return grad.to(dtype)


def word_grad(
    grad_out: torch.Tensor,
    input_ids: torch.Tensor,
    num_prompt: int,
    num_word_rows: int,
    embed_scale: float | torch.Tensor | None,
    padding_idx: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Gradient of ``word_weight``: [V, D] in ``dtype``, from grad_out[:, T:] (times ``embed_scale``).

    Accumulates in float32 with ``index_add_`` (a fixed order on CPU: bit-identical from run to run;
    on CUDA this fallback uses atomics, the Triton backend does not). The ``padding_idx`` row gets zero
    gradient, like ``nn.Embedding``.
    """
    batch, seq_len = input_ids.shape
    dim = grad_out.shape[2]
    grad = torch.zeros(num_word_rows, dim, dtype=torch.float32, device=grad_out.device)
    ids = input_ids.long()
    tensor_scale = isinstance(embed_scale, torch.Tensor)
    alpha = 1.0 if embed_scale is None or tensor_scale else embed_scale
    for b in range(batch if seq_len > 0 else 0):
        # One batch row at a time: at most an [L, D] float32 temporary (none for an fp32 grad).
        rows = grad_out[b, num_prompt:].float()
        if tensor_scale:
            rows = rows * embed_scale.float()
        grad.index_add_(0, ids[b], rows, alpha=alpha)
    if padding_idx is not None:
        grad[padding_idx] = 0
    return grad.to(dtype)
