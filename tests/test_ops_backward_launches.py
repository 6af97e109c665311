"""What one backward launches: the prompt gradient of prompt_indices=None is ONE kernel, no sort.

Every @triton.jit kernel of the kernels package is wrapped to record its launches, and a
TorchDispatchMode records the ATen ops, while ``out.backward`` runs on the Triton backend (interpreted).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastprompt

pytest.importorskip("triton")

B, L, V, P, D = 4, 6, 11, 5, 8


class _Counting:
    """A kernel stand-in: ``kernel[grid](...)`` records the kernel's name, then launches it."""

    def __init__(self, kernel, name: str, launches: list):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(self.name)
            return self.kernel[grid](*args, **kwargs)

        return launch


class _AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launches(monkeypatch):
    from fastprompt.kernels import prompt_concat_bwd, prompt_concat_fwd

    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")
    recorded: list[str] = []
    for module in (prompt_concat_fwd, prompt_concat_bwd):
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _Counting(getattr(module, name), name, recorded))
    return recorded


def _backward(launches, word_requires_grad: bool, prompt_indices=None, ids=None):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, L), generator=gen) if ids is None else ids
    word = torch.randn(V, D, generator=gen).requires_grad_(word_requires_grad)
    prompt = torch.randn(P, D, generator=gen, requires_grad=True)
    out = fastprompt.prompt_concat(ids, word, prompt, prompt_indices)
    assert launches == ["_prompt_concat_fwd_kernel"]  # the forward: one launch
    launches.clear()
    mode = _AtenOps()
    with mode:
        out.backward(torch.randn(out.shape, generator=gen))
    return mode.ops, word, prompt


def test_prompt_grad_of_all_rows_is_one_launch_without_sort(launches):
    ops, _, prompt = _backward(launches, word_requires_grad=False)
    assert launches == ["_batch_rows_sum_kernel"]
    assert not {"aten.sort", "aten.searchsorted", "aten.arange"} & set(ops), ops
    assert prompt.grad is not None


def test_a_pad_token_everywhere_still_takes_two_fixed_launches(launches):
    ids = torch.full((B, L), 3)  # one id in every position: one segment of B*L entries
    ops, word, prompt = _backward(launches, word_requires_grad=True, ids=ids)
    assert sorted(launches) == sorted(
        ["_batch_rows_sum_kernel", "_segment_chunk_kernel", "_segment_finish_kernel"]
    )
    assert ops.count("aten.sort") == 1 and ops.count("aten.searchsorted") == 1  # the word gradient's
    expected = torch.zeros(V, D)
    assert word.grad[3].abs().sum() > 0 and torch.equal(word.grad[:3], expected[:3])


def test_indexed_prompt_grad_uses_the_segmented_kernels(launches):
    pidx = torch.tensor([4, 0, 4, 1])
    _backward(launches, word_requires_grad=False, prompt_indices=pidx)
    assert launches == ["_segment_chunk_kernel", "_segment_finish_kernel"]
