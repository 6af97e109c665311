"""Property-based tests: random shapes, dtypes, index patterns and strides against the reference."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastprompt
from fastprompt.testing import FLOAT_DTYPES, tolerance
from fastprompt.testing.reference import (
    assert_close_to_reference,
    poisoned_empty,
    reference_forward,
    reference_grads,
    strided_table,
)

DTYPES = st.sampled_from(list(FLOAT_DTYPES))
LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced"])


@st.composite
def problems(draw):
    batch = draw(st.integers(0, 3))
    seq_len = draw(st.integers(0, 6))
    vocab = draw(st.integers(1, 12))
    prompt_rows = draw(st.integers(1, 6))
    dim = draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    word = strided_table(vocab, dim, draw(DTYPES), draw(LAYOUTS), gen)
    prompt = strided_table(prompt_rows, dim, draw(DTYPES), draw(LAYOUTS), gen)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    if draw(st.booleans()):
        ids = ids.t().contiguous().t()  # column-major [B, L]
    mode = draw(st.sampled_from(["all", "shared", "per_batch"]))
    num_prompt = draw(st.integers(0, 5))
    pidx = {
        "all": None,
        "shared": torch.randint(0, prompt_rows, (num_prompt,), generator=gen),
        "per_batch": torch.randint(0, prompt_rows, (batch, num_prompt), generator=gen),
    }[mode]
    scale = draw(st.sampled_from([None, 0.5, 3.0]))
    padding_idx = draw(st.sampled_from([None, 0, -1]))
    return ids, word, prompt, pidx, scale, padding_idx


def _check(problem):
    ids, word, prompt, pidx, scale, padding_idx = problem
    word = word.detach().requires_grad_()
    prompt = prompt.detach().requires_grad_()
    with poisoned_empty():
        out = fastprompt.prompt_concat(ids, word, prompt, pidx, embed_scale=scale, padding_idx=padding_idx)
    tol = tolerance(word.dtype, prompt.dtype)
    assert out.dtype == word.dtype
    assert_close_to_reference(out, reference_forward(ids, word, prompt, pidx, scale), tol)
    grad_out = torch.randn(out.shape).to(out.dtype)
    out.backward(grad_out)
    pad = None if padding_idx is None else padding_idx % word.shape[0]
    ref_word, ref_prompt = reference_grads(grad_out, ids, word.shape[0], prompt.shape[0], pidx, scale, pad)
    count = max(1, ids.numel())
    assert_close_to_reference(prompt.grad, ref_prompt, tolerance(prompt.dtype, word.dtype), scale=count)
    assert_close_to_reference(word.grad, ref_word, tolerance(word.dtype), scale=count)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_torch_path_matches_reference(problem):
    os.environ["FASTPROMPT_BACKEND"] = "torch"
    _check(problem)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_triton_kernels_match_reference(problem):
    pytest.importorskip("triton")
    os.environ["FASTPROMPT_BACKEND"] = "triton"
    try:
        _check(problem)
    finally:
        os.environ["FASTPROMPT_BACKEND"] = "torch"
