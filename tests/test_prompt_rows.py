"""``prompted_embeds.prompt_rows``: prompt rows computed by a module (an encoder's output), then one
fused concat.

Reference: plain torch (``cat(rows[index], word(ids))``); the output poisoned nowhere (a fresh tensor), its
gradients checked against autograd's through the reference under a random upstream gradient.
"""

from __future__ import annotations

import pytest
import torch

from fastprompt.prompted_embeds import prompted_inputs_embeds
from fastprompt.prompted_embeds.fused_concat import CALLS
from fastprompt.prompted_embeds.prompt_rows import (
    ENCODER,
    STORED,
    TABLE,
    TASK,
    PromptSource,
    source_rows,
)


class _Encoder(torch.nn.Module):
    """P-tuning's shape: an MLP over a table (rows = the MLP's output)."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(rows, dim)
        self.head = torch.nn.Linear(dim, dim)

    def forward(self, indices):
        return self.head(self.embedding(indices))


class _Tasks(torch.nn.Module):
    """Multitask's shape: the table scaled per task."""

    def __init__(self, rows: int, dim: int, tasks: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(rows, dim)
        self.scale = torch.nn.Parameter(torch.randn(tasks, rows, dim))

    def forward(self, indices, task_ids):
        return self.embedding(indices) * self.scale[task_ids]


def _reference(input_ids, word, rows, index):
    prompts = rows.expand(input_ids.shape[0], -1, -1) if index is None else rows[index]
    return torch.cat((prompts.to(word.weight.dtype), word(input_ids)), dim=1)


@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "word module hooked"])
def test_rows_inputs_embeds_equals_torch(hooked):
    torch.manual_seed(0)
    word = torch.nn.Embedding(50, 8)
    if hooked:
        word.register_forward_hook(lambda module, args, out: None)
    ids = torch.randint(0, 50, (4, 5))
    rows = torch.randn(2, 3, 8, requires_grad=True)
    index = torch.tensor([1, 0, 1, 1])
    before = dict(CALLS)
    out = prompted_inputs_embeds(ids, word, rows, index)
    assert CALLS["unfused" if hooked else "fused"] == before.get("unfused" if hooked else "fused", 0) + 1
    expected = _reference(ids, word, rows, index)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    upstream = torch.randn(out.shape)
    (grad,) = torch.autograd.grad(out, rows, upstream)
    (grad_ref,) = torch.autograd.grad(expected, rows, upstream)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-6)
    single = prompted_inputs_embeds(ids, word, rows[:1])
    torch.testing.assert_close(single, _reference(ids, word, rows[:1], None), rtol=0, atol=0)
    with pytest.raises(ValueError, match="K = 1 without index"):
        prompted_inputs_embeds(ids, word, rows)


def test_source_rows_call_the_modules():
    """Each kind of source: the encoder's output (gradient into its head), the stored table, the task-scaled
    rows (one module call for all tasks of a module), the plain table; N of each."""
    torch.manual_seed(0)
    encoder, tasks, table = _Encoder(4, 8), _Tasks(4, 8, 3), _Encoder(4, 8)
    sources = [
        PromptSource(encoder, ENCODER),
        PromptSource(tasks, TASK, 2),
        PromptSource(encoder, STORED),
        PromptSource(tasks, TASK, 0),
    ]
    calls = []
    tasks.register_forward_hook(lambda module, args, out: calls.append(args[1].tolist()))
    rows = source_rows(sources, 3, torch.float64)
    assert rows.shape == (4, 3, 8) and rows.dtype == torch.float64 and calls == [[2, 0]]
    tokens = torch.arange(4)[None]
    torch.testing.assert_close(rows[0], encoder(tokens)[0, :3].double())
    torch.testing.assert_close(rows[1], tasks(tokens, torch.tensor([2]))[0, :3].double())
    torch.testing.assert_close(rows[2], encoder.embedding.weight[:3].double())
    torch.testing.assert_close(rows[3], tasks(tokens, torch.tensor([0]))[0, :3].double())
    rows.sum().backward()
    assert encoder.head.weight.grad is not None and tasks.scale.grad[1].abs().sum() == 0
    assert torch.equal(source_rows([PromptSource(table, TABLE)], 4)[0], table(tokens)[0])
    with pytest.raises(ValueError, match="takes a task id"):
        PromptSource(tasks, TASK)
    with pytest.raises(ValueError, match="takes no task id"):
        PromptSource(encoder, ENCODER, 1)
