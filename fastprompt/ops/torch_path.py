"""The pure-PyTorch implementation of the fused op (CPU, or wherever Triton cannot run).

Fused as far as eager PyTorch allows: the output is allocated once and each part is written into it
once (``index_select(..., out=)`` per batch row), so no ``[B, L, D]`` temporary and no ``cat``.
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
    indices = _prompt_index_rows(prompt_indices, prompt_weight.shape[0], input_ids.device)
    num_prompt = indices.shape[-1]
    out = torch.empty(batch, num_prompt + seq_len, dim, dtype=word_weight.dtype, device=word_weight.device)
    if batch == 0:
        return out
    ids = input_ids.long()
    same_dtype = prompt_weight.dtype == word_weight.dtype
    if indices.dim() == 1 and num_prompt > 0:
        prompt_rows = prompt_weight.index_select(0, indices)  # [T, D], read once, broadcast on copy
        out[:, :num_prompt].copy_(prompt_rows.unsqueeze(0).expand(batch, -1, -1))
    for b in range(batch):
        if indices.dim() == 2 and num_prompt > 0:
            if same_dtype:
                torch.index_select(prompt_weight, 0, indices[b], out=out[b, :num_prompt])
            else:
                out[b, :num_prompt].copy_(prompt_weight.index_select(0, indices[b]))
        if seq_len > 0 and embed_scale is None:
            torch.index_select(word_weight, 0, ids[b], out=out[b, num_prompt:])
        elif seq_len > 0:
            # Scaled: an [L, D] temporary per batch row, so the output is still written once.
            torch.mul(word_weight.index_select(0, ids[b]), embed_scale, out=out[b, num_prompt:])
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
