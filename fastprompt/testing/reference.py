"""The float64 reference of ``prompt_concat`` and helpers to build its inputs and compare with it.

Shared by the op tests (``tests/``) and ``python -m fastprompt check`` (``fastprompt.testing.parity``).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


def reference_forward(input_ids, word_weight, prompt_weight, prompt_indices=None, embed_scale=None):
    """[B, T+L, D] float64: the prompt rows, then the token rows times ``embed_scale``."""
    batch = input_ids.shape[0]
    prompts = prompt_weight.double()
    if prompt_indices is None:
        prompt_rows = prompts.unsqueeze(0).expand(batch, -1, -1)
    elif prompt_indices.dim() == 1:
        prompt_rows = prompts[prompt_indices.long()].unsqueeze(0).expand(batch, -1, -1)
    else:
        prompt_rows = prompts[prompt_indices.long()]
    tokens = word_weight.double()[input_ids.long()]
    if embed_scale is not None:
        tokens = tokens * embed_scale
    return torch.cat((prompt_rows, tokens), dim=1)


def reference_grads(
    grad_out, input_ids, num_word_rows, num_prompt_rows, prompt_indices, embed_scale, padding_idx
):
    """(word_grad [V, D], prompt_grad [P, D]) float64 for upstream gradient ``grad_out``."""
    grad = grad_out.double()
    batch, _, dim = grad.shape
    if prompt_indices is None:
        index = torch.arange(num_prompt_rows).expand(batch, -1)
    elif prompt_indices.dim() == 1:
        index = prompt_indices.long().expand(batch, -1)
    else:
        index = prompt_indices.long()
    num_prompt = index.shape[1]
    prompt_grad = torch.zeros(num_prompt_rows, dim, dtype=torch.float64)
    prompt_grad.index_add_(0, index.reshape(-1), grad[:, :num_prompt].reshape(-1, dim))
    token_grad = grad[:, num_prompt:].reshape(-1, dim)
    if embed_scale is not None:
        token_grad = token_grad * embed_scale
    word_grad = torch.zeros(num_word_rows, dim, dtype=torch.float64)
    word_grad.index_add_(0, input_ids.long().reshape(-1), token_grad)
    if padding_idx is not None:
        word_grad[padding_idx] = 0
    return word_grad, prompt_grad


def strided_table(rows: int, dim: int, dtype: torch.dtype, layout: str, generator=None) -> torch.Tensor:
    """A [rows, dim] table, ``contiguous``, ``transposed`` (column-major) or ``sliced`` (row stride 2*dim)."""
    if layout == "contiguous":
        return torch.randn(rows, dim, generator=generator).to(dtype)
    if layout == "transposed":
        return torch.randn(dim, rows, generator=generator).to(dtype).t()
    if layout == "sliced":
        return torch.randn(rows, 2 * dim, generator=generator).to(dtype)[:, ::2]
    raise ValueError(layout)


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, tol: dict, scale: float = 1.0):
    """Compare to a float64 reference; ``scale`` widens atol for sums of ``scale`` terms."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not torch.isnan(actual).any(), "NaN in the result: an element was not written"
    torch.testing.assert_close(
        actual.double(), expected, atol=tol["atol"] * max(1.0, math.sqrt(scale)), rtol=tol["rtol"]
    )


@contextlib.contextmanager
def poisoned_empty():
    """Make every floating-point ``torch.empty`` return NaN-filled memory while active.

    The op allocates its outputs with ``torch.empty``: poisoning them makes an element the op forgot
    to write show up as NaN instead of passing by luck on recycled zeros.
    """
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real_empty


def peft_concat(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    prompt_weight: torch.Tensor,
    prompt_tokens: torch.Tensor,
) -> torch.Tensor:
    """PEFT's eager code path for prompt tuning (peft 0.21 ``PeftModelForCausalLM.forward``), op by op.

    ``word_embeddings(input_ids)``; ``get_prompt``: prompt tokens expanded to the batch, the first row
    taken, ``prompt_encoder(...)`` (an ``nn.Embedding``), ``.repeat(batch, 1, 1)``; then
    ``prompts.to(inputs_embeds.dtype)`` and ``torch.cat((prompts, inputs_embeds), dim=1)``.
    """
    batch = input_ids.shape[0]
    inputs_embeds = F.embedding(input_ids, word_weight)
    tokens = prompt_tokens.unsqueeze(0).expand(batch, -1)[:1]
    prompts = F.embedding(tokens, prompt_weight)
    prompts = prompts.repeat(batch, 1, 1)
    prompts = prompts.to(inputs_embeds.dtype)
    return torch.cat((prompts, inputs_embeds), dim=1)
