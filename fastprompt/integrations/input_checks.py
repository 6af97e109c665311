"""Model-level input checks for the prompt-tuning path, before anything reaches the base model.

Without them, bad input surfaces as an error from deep inside torch or transformers (``Expected tensor for
argument #1 'indices'``, ``Tensors must have same number of dimensions``, ``cannot reshape tensor of 0
elements``) or, for an attention mask of another length, as an output of the wrong length with no error
at all (PEFT accepts it). :func:`check_prompt_inputs` is called by the forward wrapper of every task type
and by the Seq2Seq ``generate`` wrapper when the fused path is taken; a CausalLM ``generate`` wrapper
calls it too.
"""

from __future__ import annotations

import torch

__all__ = ["check_prompt_inputs"]

INDEX_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding (and prompt_concat) take


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__}"


def check_prompt_inputs(input_ids, attention_mask=None) -> None:
    """Raise a clear error unless ``input_ids`` / ``attention_mask`` are what a prompt-tuning model takes.

    Args:
        input_ids: must be an int64 or int32 tensor of shape [B, L], B >= 1 (L = 0 is allowed: the model
            then sees only the virtual tokens).
        attention_mask: None, or a tensor of the same shape [B, L] as ``input_ids`` (any dtype; the model
            prefixes it with N ones for the virtual tokens).

    Raises:
        TypeError: ``input_ids`` is not a tensor or not int64/int32; ``attention_mask`` is not a tensor.
        ValueError: ``input_ids`` is not 2-D or has no rows; ``attention_mask``'s shape differs from
            ``input_ids``'.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"input_ids must be a tensor of token ids (torch.int64 or torch.int32) of shape "
            f"[batch, seq_len]; got {_describe(input_ids)}."
        )
    if input_ids.dim() != 2:
        hint = " (a single sequence: use input_ids[None])" if input_ids.dim() == 1 else ""
        raise ValueError(f"input_ids must be 2-D, [batch, seq_len]; got {_describe(input_ids)}{hint}.")
    if input_ids.shape[0] == 0:
        raise ValueError(
            f"input_ids has an empty batch (shape {tuple(input_ids.shape)}): expected at least one row "
            "(transformers models cannot run a batch of 0)."
        )
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be None or a tensor of the shape of input_ids {tuple(input_ids.shape)}; "
            f"got {_describe(attention_mask)}."
        )
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids: input_ids has shape {tuple(input_ids.shape)}, "
            f"attention_mask has shape {tuple(attention_mask.shape)}."
        )
