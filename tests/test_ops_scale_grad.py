"""A tensor ``embed_scale`` that requires grad gets its gradient: sum over token rows of <grad, word row>."""

from __future__ import annotations

import pytest
import torch
from conftest import tolerance
from op_reference import assert_close_to_reference, reference_forward

import fastprompt

B, L, V, P, D = 3, 5, 9, 4, 6


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=gen)
    word = torch.randn(V, D, generator=gen)
    prompt = torch.randn(P, D, generator=gen)
    grad_out = torch.randn(B, P + L, D, generator=gen)
    return ids, word, prompt, grad_out


def _reference(ids, word, prompt, scale, grad_out):
    """(d/dscale, d/dword) by autograd of the float64 reference."""
    scale64 = scale.detach().double().requires_grad_()
    word64 = word.detach().double().requires_grad_()
    out = reference_forward(ids, word64, prompt, None, scale64)
    (out * grad_out.double()).sum().backward()
    return scale64.grad, word64.grad


@pytest.mark.parametrize("shape", [(), (1,)])
@pytest.mark.parametrize("word_grad", [False, True])
def test_scale_gradient_matches_float64_autograd(backend, shape, word_grad):
    ids, word, prompt, grad_out = _inputs(1)
    scale = torch.full(shape, 1.7, requires_grad=True)
    word.requires_grad_(word_grad)
    out = fastprompt.prompt_concat(ids, word, prompt, embed_scale=scale)
    out.backward(grad_out)
    ref_scale, ref_word = _reference(ids, word, prompt, scale, grad_out)
    assert scale.grad is not None and scale.grad.shape == scale.shape and scale.grad.dtype == scale.dtype
    assert_close_to_reference(
        scale.grad.reshape(()), ref_scale.reshape(()), tolerance(torch.float32), scale=B * L * D
    )
    if word_grad:
        assert_close_to_reference(word.grad, ref_word, tolerance(torch.float32), scale=B * L)


def test_scale_gradient_in_its_own_dtype():
    ids, word, prompt, grad_out = _inputs(2)
    scale = torch.tensor(0.5, dtype=torch.bfloat16, requires_grad=True)
    fastprompt.prompt_concat(ids, word, prompt, embed_scale=scale).backward(grad_out)
    ref_scale, _ = _reference(ids, word, prompt, scale, grad_out)
    assert scale.grad.dtype == torch.bfloat16
    assert_close_to_reference(scale.grad, ref_scale, tolerance(torch.bfloat16), scale=B * L * D)


def test_scale_gradient_through_the_registered_autograd():
    ids, word, prompt, _ = _inputs(3)
    scale = torch.tensor(1.25, requires_grad=True)
    sample = (ids, word.requires_grad_(), prompt.requires_grad_(), None, None, scale, None, None)
    torch.library.opcheck(torch.ops.fastprompt.prompt_concat.default, sample)


def test_scale_gradient_under_compile_equals_eager():
    ids, word, prompt, grad_out = _inputs(4)
    torch._dynamo.reset()

    def fn(scale):
        return fastprompt.prompt_concat(ids, word, prompt, embed_scale=scale)

    grads = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        scale = torch.tensor(0.9, requires_grad=True)
        f(scale).backward(grad_out)
        grads.append(scale.grad)
    torch.testing.assert_close(grads[1], grads[0])
