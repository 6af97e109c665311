"""Argument checks for ``prompt_concat``.

Two kinds:
- ``check_metadata``: ranks, dtypes, devices and shapes. Reads no tensor values, so it runs in the
  fake (meta) kernel too and never causes a host sync or a graph break.
- ``check_index_bounds``: reads the index values (a host sync on CUDA). It runs inside the real op
  only, where ``torch.compile`` does not trace: opt-in on CUDA; always in the interpreter; on the CPU
  torch path only after ``index_select`` (which checks every id itself) has failed, to name the
  argument, the value and the table in the error.
"""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)


def _check_index_tensor(name: str, t: torch.Tensor, ranks: tuple[int, ...], expected: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of {expected}, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"{name} must hold integer ids (torch.int64 or torch.int32), got dtype {t.dtype}; "
            f"expected {expected}"
        )
    if t.dim() not in ranks:
        raise ValueError(f"{name} must be {expected}, got a tensor of shape {tuple(t.shape)}")


def _check_table(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [rows, D], got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point table (float32, float16 or bfloat16), got dtype {t.dtype}"
        )
    zero3_like = t.numel() == 0 and (t.dim() != 2 or t.shape[1] == 0 or name == "word_weight")
    if zero3_like:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}, 0 elements: there is nothing to look up. A 0-element "
            "weight is what DeepSpeed ZeRO-3 leaves outside a GatheredParameters context: gather the "
            "parameters before calling the op"
        )
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D table [rows, D], got a tensor of shape {tuple(t.shape)}")


def check_metadata(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    prompt_weight: torch.Tensor,
    prompt_indices: torch.Tensor | None,
    padding_idx: int | None = None,
    embed_scale_tensor: torch.Tensor | None = None,
) -> None:
    """Raise TypeError/ValueError for arguments ``prompt_concat`` cannot take. Reads no values."""
    _check_index_tensor("input_ids", input_ids, (2,), "a 2-D tensor [B, L] of token ids")
    _check_table("word_weight", word_weight)
    _check_table("prompt_weight", prompt_weight)
    if word_weight.shape[1] != prompt_weight.shape[1]:
        raise ValueError(
            f"word_weight and prompt_weight must have the same embedding size D: word_weight is "
            f"{tuple(word_weight.shape)}, prompt_weight is {tuple(prompt_weight.shape)}"
        )
    if prompt_indices is not None:
        _check_index_tensor(
            "prompt_indices", prompt_indices, (1, 2), "None, a 1-D tensor [T] or a 2-D tensor [B, T]"
        )
        if prompt_indices.dim() == 2 and prompt_indices.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"prompt_indices of shape {tuple(prompt_indices.shape)} must have one row per batch row: "
                f"input_ids has B={input_ids.shape[0]} rows, so expected [{input_ids.shape[0]}, T]"
            )
    device = input_ids.device
    others = (word_weight, prompt_weight, prompt_indices, embed_scale_tensor)
    if (
        word_weight.device != device
        or prompt_weight.device != device
        or (prompt_indices is not None and prompt_indices.device != device)
        or (embed_scale_tensor is not None and embed_scale_tensor.device != device)
    ):  # the message is built only here
        names = ("input_ids", "word_weight", "prompt_weight", "prompt_indices", "embed_scale")
        listed = ", ".join(
            f"{n} on {t.device}" for n, t in zip(names, (input_ids, *others), strict=True) if t is not None
        )
        raise ValueError(f"prompt_concat needs all tensors on one device, got {listed}")
    if padding_idx is not None:
        vocab = word_weight.shape[0]
        is_int = isinstance(padding_idx, int) and not isinstance(padding_idx, bool)
        if not is_int or not -vocab <= padding_idx < vocab:
            raise ValueError(
                f"padding_idx={padding_idx!r} must be None or an int in [-{vocab}, {vocab}) "
                f"(word_weight has {vocab} rows)"
            )


def bounds_check_requested(device: torch.device, check_bounds: bool | None) -> bool:
    """Whether the value check runs: always off CUDA; on CUDA if asked or FASTPROMPT_CHECK_BOUNDS=1."""
    if device.type != "cuda":
        return True
    if check_bounds is not None:
        return bool(check_bounds)
    return os.environ.get("FASTPROMPT_CHECK_BOUNDS", "0") not in ("", "0", "false", "False")


def _check_ids_in_range(name: str, ids: torch.Tensor, rows: int, table: str) -> None:
    if ids.numel() == 0:
        return
    low, high = torch.aminmax(ids)  # one pass; the position is only looked up on failure
    if int(low) >= 0 and int(high) < rows:
        return
    bad = (ids < 0) | (ids >= rows)
    position = tuple(int(i) for i in bad.nonzero()[0])
    value = int(ids[position])
    raise IndexError(
        f"{name} holds {value} at position {position}, out of range for {table} with {rows} rows: "
        f"every id must be in [0, {rows})"
    )


def check_index_bounds(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    prompt_weight: torch.Tensor,
    prompt_indices: torch.Tensor | None,
) -> None:
    """Raise IndexError naming the argument, the value and the table size for any id out of range."""
    _check_ids_in_range("input_ids", input_ids, word_weight.shape[0], "word_weight")
    if prompt_indices is not None:
        _check_ids_in_range("prompt_indices", prompt_indices, prompt_weight.shape[0], "prompt_weight")
