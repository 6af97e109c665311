"""prompt_concat on every backend against the float64 reference: forward, both gradients, edge shapes."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from conftest import tolerance
from op_reference import (
    assert_close_to_reference,
    poisoned_empty,
    reference_forward,
    reference_grads,
    strided_table,
)

import fastprompt

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
B, L, V, P, D = 3, 6, 17, 5, 12


def _indices(mode: str, batch: int, num_prompt_rows: int, gen) -> torch.Tensor | None:
    if mode == "all":
        return None
    if mode == "shared":  # [T], with a repeated row
        return torch.tensor([4, 0, 2, 2, 1, 3, 4]) % num_prompt_rows
    return torch.randint(0, num_prompt_rows, (batch, 7), generator=gen)  # [B, T], rows repeat


def _run(backend_inputs, requires_word_grad=True):
    ids, word, prompt, pidx, scale, padding_idx = backend_inputs
    word = word.detach().requires_grad_(requires_word_grad)
    prompt = prompt.detach().requires_grad_(True)
    with poisoned_empty():
        out = fastprompt.prompt_concat(ids, word, prompt, pidx, embed_scale=scale, padding_idx=padding_idx)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
        out.backward(grad_out)
    return out, grad_out, word.grad, prompt.grad


@pytest.mark.parametrize("mode", ["all", "shared", "per_batch"])
@pytest.mark.parametrize(("word_dtype", "prompt_dtype"), list(itertools.product(DTYPES, DTYPES)))
def test_matches_reference_all_dtype_pairs(backend, mode, word_dtype, prompt_dtype):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, L), generator=gen)
    word = torch.randn(V, D, generator=gen).to(word_dtype)
    prompt = torch.randn(P, D, generator=gen).to(prompt_dtype)
    pidx = _indices(mode, B, P, gen)
    scale, padding_idx = (None, None) if mode == "all" else (2.5, int(ids[0, 0]))
    out, grad_out, word_grad, prompt_grad = _run((ids, word, prompt, pidx, scale, padding_idx))

    assert out.dtype == word_dtype and out.shape == (B, (P if pidx is None else pidx.shape[-1]) + L, D)
    expected = reference_forward(ids, word, prompt, pidx, scale)
    assert_close_to_reference(out, expected, tolerance(word_dtype, prompt_dtype))

    ref_word, ref_prompt = reference_grads(grad_out, ids, V, P, pidx, scale, padding_idx)
    assert prompt_grad.dtype == prompt_dtype and word_grad.dtype == word_dtype
    assert_close_to_reference(prompt_grad, ref_prompt, tolerance(prompt_dtype, word_dtype), scale=B * 2)
    assert_close_to_reference(word_grad, ref_word, tolerance(word_dtype), scale=B * L)
    if padding_idx is not None:
        assert torch.all(word_grad[padding_idx] == 0)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_non_contiguous_inputs(backend, layout):
    gen = torch.Generator().manual_seed(1)
    word = strided_table(V, D, torch.float32, layout, gen)
    prompt = strided_table(P, D, torch.float32, layout, gen)
    ids = torch.randint(0, V, (L, B), generator=gen).t()  # [B, L], column-major
    pidx = torch.randint(0, P, (B, 8), generator=gen)[:, ::2]  # [B, 4], stride 2
    assert not (word.is_contiguous() or prompt.is_contiguous() or ids.is_contiguous())
    out, grad_out, word_grad, prompt_grad = _run((ids, word, prompt, pidx, 0.5, None))
    assert_close_to_reference(out, reference_forward(ids, word, prompt, pidx, 0.5), tolerance(torch.float32))
    ref_word, ref_prompt = reference_grads(grad_out, ids, V, P, pidx, 0.5, None)
    assert_close_to_reference(prompt_grad, ref_prompt, tolerance(torch.float32), scale=B)
    assert_close_to_reference(word_grad, ref_word, tolerance(torch.float32), scale=B * L)


def test_non_contiguous_upstream_gradient(backend):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (B, L), generator=gen)
    word = torch.randn(V, D, generator=gen).requires_grad_()
    prompt = torch.randn(P, D, generator=gen).requires_grad_()
    out = fastprompt.prompt_concat(ids, word, prompt)
    grad_out = torch.randn(D, B, P + L, generator=gen).permute(1, 2, 0)  # non-contiguous
    out.backward(grad_out)
    ref_word, ref_prompt = reference_grads(grad_out, ids, V, P, None, None, None)
    assert_close_to_reference(prompt.grad, ref_prompt, tolerance(torch.float32), scale=B)
    assert_close_to_reference(word.grad, ref_word, tolerance(torch.float32), scale=B * L)


@pytest.mark.parametrize(
    ("batch", "seq_len", "num_prompt", "dim"),
    [(0, 4, 3, 8), (2, 0, 3, 8), (2, 4, 0, 8), (0, 0, 0, 8), (2, 3, 2, 1), (2, 3, 2, 37), (1, 5, 4, 130)],
)
def test_edge_shapes(backend, batch, seq_len, num_prompt, dim):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (batch, seq_len), generator=gen)
    word = torch.randn(V, dim, generator=gen).requires_grad_()
    prompt = torch.randn(max(num_prompt, 1), dim, generator=gen)[:num_prompt].clone().requires_grad_()
    with poisoned_empty():
        out = fastprompt.prompt_concat(ids, word, prompt)
    assert out.shape == (batch, num_prompt + seq_len, dim)
    assert_close_to_reference(out, reference_forward(ids, word, prompt), tolerance(torch.float32))
    grad_out = torch.randn(out.shape, generator=gen)
    out.backward(grad_out)
    ref_word, ref_prompt = reference_grads(grad_out, ids, V, num_prompt, None, None, None)
    assert_close_to_reference(prompt.grad, ref_prompt, tolerance(torch.float32), scale=batch)
    assert_close_to_reference(word.grad, ref_word, tolerance(torch.float32), scale=batch * seq_len)


def test_int32_ids_and_indices(backend):
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, V, (B, L), generator=gen, dtype=torch.int32)
    pidx = torch.randint(0, P, (B, 3), generator=gen, dtype=torch.int32)
    word, prompt = torch.randn(V, D, generator=gen), torch.randn(P, D, generator=gen).requires_grad_()
    out = fastprompt.prompt_concat(ids, word, prompt, pidx)
    assert_close_to_reference(out, reference_forward(ids, word, prompt, pidx), tolerance(torch.float32))
    grad_out = torch.randn(out.shape, generator=gen)
    out.backward(grad_out)
    _, ref_prompt = reference_grads(grad_out, ids, V, P, pidx, None, None)
    assert_close_to_reference(prompt.grad, ref_prompt, tolerance(torch.float32), scale=B)


def test_word_grad_only_when_word_table_requires_grad(backend, monkeypatch):
    calls = []
    op_module = importlib.import_module("fastprompt.ops.prompt_concat")
    real = op_module._word_grad_impl  # what the eager path and the backward op both call
    monkeypatch.setattr(op_module, "_word_grad_impl", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, V, (B, L))
    word, prompt = torch.randn(V, D), torch.randn(P, D, requires_grad=True)
    fastprompt.prompt_concat(ids, word, prompt).backward(torch.randn(B, P + L, D))
    assert word.grad is None and prompt.grad is not None and calls == []
    word.requires_grad_()
    fastprompt.prompt_concat(ids, word, prompt).backward(torch.randn(B, P + L, D))
    assert word.grad is not None and calls == [1]


@pytest.mark.parametrize("mode", ["all", "shared", "per_batch"])
def test_backward_is_deterministic(backend, mode):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 4, (4, 9), generator=gen)  # few distinct ids: long segments
    pidx = _indices(mode, 4, P, gen)
    grad_out = None
    grads = []
    for _ in range(2):
        word = torch.randn(V, D, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
        prompt = torch.randn(P, D, generator=torch.Generator().manual_seed(9)).requires_grad_()
        word.requires_grad_()
        out = fastprompt.prompt_concat(ids, word, prompt, pidx, embed_scale=1.7)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=gen).to(out.dtype)
        out.backward(grad_out)
        grads.append((word.grad.clone(), prompt.grad.clone()))
    assert torch.equal(grads[0][0].view(torch.int16), grads[1][0].view(torch.int16))
    assert torch.equal(grads[0][1].view(torch.int32), grads[1][1].view(torch.int32))


def test_backends_agree():
    """torch path and Triton kernels (interpreter) compute the same function."""
    import os

    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, V, (B, L), generator=gen)
    word, prompt = torch.randn(V, D, generator=gen), torch.randn(P, D, generator=gen)
    pidx = torch.randint(0, P, (B, 4), generator=gen)
    results = {}
    for name in ("torch", "triton"):
        os.environ["FASTPROMPT_BACKEND"] = name
        try:
            results[name] = fastprompt.prompt_concat(ids, word, prompt, pidx, embed_scale=3.0)
        finally:
            os.environ["FASTPROMPT_BACKEND"] = "torch"
    torch.testing.assert_close(results["torch"], results["triton"], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_is_bit_exact_with_pytorch_multiply(backend, dtype):
    """A float scale gives ``emb * float``; a tensor scale ``emb * tensor`` (Gemma3: scale rounded to
    the weight dtype first, BART: a Python float), both as PyTorch computes them."""
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, V, (B, L), generator=gen)
    word, prompt = torch.randn(V, 64, generator=gen).to(dtype), torch.randn(P, 64, generator=gen)
    float_scale = 2048**0.5
    gemma_scale = torch.tensor(float_scale).to(dtype)  # Gemma3: embed_scale.to(weight.dtype)
    exact = dtype == torch.float32 or backend == "torch"  # the interpreter truncates fp32 -> bf16/fp16
    for scale, expected in [
        (float_scale, torch.nn.functional.embedding(ids, word) * float_scale),
        (gemma_scale, torch.nn.functional.embedding(ids, word) * gemma_scale),
    ]:
        out = fastprompt.prompt_concat(ids, word, prompt, embed_scale=scale)[:, P:]
        if exact:
            assert torch.equal(out, expected)
        else:
            torch.testing.assert_close(out, expected, **tolerance(dtype))


def test_tensor_scale_gradient(backend):
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, V, (B, L), generator=gen)
    word = torch.randn(V, D, generator=gen).requires_grad_()
    prompt = torch.randn(P, D, generator=gen).requires_grad_()
    out = fastprompt.prompt_concat(ids, word, prompt, embed_scale=torch.tensor(0.75))
    grad_out = torch.randn(out.shape, generator=gen)
    out.backward(grad_out)
    ref_word, ref_prompt = reference_grads(grad_out, ids, V, P, None, 0.75, None)
    assert_close_to_reference(word.grad, ref_word, tolerance(torch.float32), scale=B * L)
    assert_close_to_reference(prompt.grad, ref_prompt, tolerance(torch.float32), scale=B)


@pytest.mark.parametrize("mode", ["all", "shared", "per_batch"])
@pytest.mark.parametrize("prompt_dtype", [torch.float32, torch.bfloat16])
def test_long_text_short_prompt(backend, mode, prompt_dtype):
    """T*8 <= L: the torch path gathers all rows in one call (placeholders at the prompt positions)."""
    gen = torch.Generator().manual_seed(10)
    ids = torch.randint(0, V, (B, 60), generator=gen)
    word = torch.randn(V, D, generator=gen)
    prompt = torch.randn(P, D, generator=gen).to(prompt_dtype)
    pidx = _indices(mode, B, P, gen)
    pidx = None if pidx is None else pidx[..., :3]
    out, grad_out, word_grad, prompt_grad = _run((ids, word, prompt, pidx, None, None))
    assert_close_to_reference(out, reference_forward(ids, word, prompt, pidx), tolerance(prompt_dtype))
    ref_word, ref_prompt = reference_grads(grad_out, ids, V, P, pidx, None, None)
    assert_close_to_reference(prompt_grad, ref_prompt, tolerance(prompt_dtype), scale=B)
    assert_close_to_reference(word_grad, ref_word, tolerance(torch.float32), scale=B * 60)
