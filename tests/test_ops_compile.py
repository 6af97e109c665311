"""The custom op under torch.library.opcheck and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

import fastprompt


def _samples():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 9, (2, 5), generator=gen)
    for word_dtype, prompt_dtype, pidx, scale, scale_tensor in [
        (torch.float32, torch.float32, None, None, None),
        (torch.bfloat16, torch.float32, torch.tensor([1, 0, 1]), 2.0, None),
        (torch.float16, torch.float16, torch.randint(0, 4, (2, 3), generator=gen), None, torch.tensor(1.5)),
    ]:
        word = torch.randn(9, 6, generator=gen).to(word_dtype).requires_grad_()
        prompt = torch.randn(4, 6, generator=gen).to(prompt_dtype).requires_grad_()
        yield (ids, word, prompt, pidx, scale, scale_tensor, 0, None)


@pytest.mark.parametrize(
    "sample", list(_samples()), ids=["fp32", "bf16-shared", "fp16-per-batch-tensor-scale"]
)
def test_opcheck(backend, sample):
    torch.library.opcheck(torch.ops.fastprompt.prompt_concat.default, sample)


def test_opcheck_backward_ops(backend):
    grad = torch.randn(2, 8, 6)
    ids = torch.randint(0, 9, (2, 5))
    torch.library.opcheck(
        torch.ops.fastprompt.prompt_concat_prompt_grad.default,
        (grad, torch.tensor([2, 0, 2]), 4, torch.float32),
    )
    torch.library.opcheck(
        torch.ops.fastprompt.prompt_concat_word_grad.default, (grad, ids, 3, 9, 1.5, None, 4, torch.bfloat16)
    )
    torch.library.opcheck(
        torch.ops.fastprompt.prompt_concat_word_grad.default,
        (grad, ids, 3, 9, None, torch.tensor(0.5), None, torch.float32),
    )


def _loss_fn(ids, word, prompt, pidx, proj):
    embeds = fastprompt.prompt_concat(ids, word, prompt, pidx, embed_scale=1.5)
    return (embeds @ proj).tanh().sum()


@pytest.mark.parametrize(
    ("backend_name", "compile_backend"),
    [("torch", "aot_eager"), ("triton", "aot_eager"), ("torch", "inductor")],
)
def test_compile_fullgraph_forward_and_backward(monkeypatch, backend_name, compile_backend):
    monkeypatch.setenv("FASTPROMPT_BACKEND", backend_name)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 9, (3, 5), generator=gen)
    pidx = torch.randint(0, 4, (3, 2), generator=gen)
    proj = torch.randn(6, 6, generator=gen)
    grads = []
    for fn in (_loss_fn, torch.compile(_loss_fn, fullgraph=True, backend=compile_backend)):
        word = torch.randn(9, 6, generator=torch.Generator().manual_seed(2)).requires_grad_()
        prompt = torch.randn(4, 6, generator=torch.Generator().manual_seed(3)).requires_grad_()
        loss = fn(ids, word, prompt, pidx, proj)
        loss.backward()
        grads.append((loss.detach(), word.grad, prompt.grad))
    for eager, compiled in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(compiled, eager)


def test_tensor_scale_compiles_without_graph_break(backend):
    """A tensor scale (Gemma3's buffer) is read on device: no .item(), no graph break."""
    torch._dynamo.reset()
    fn = torch.compile(
        lambda ids, w, p, s: fastprompt.prompt_concat(ids, w, p, embed_scale=s),
        fullgraph=True,
        backend="aot_eager",
    )
    ids, word, prompt = torch.randint(0, 9, (2, 3)), torch.randn(9, 6), torch.randn(4, 6)
    scale = torch.tensor(2.5)
    torch.testing.assert_close(
        fn(ids, word, prompt, scale), fastprompt.prompt_concat(ids, word, prompt, embed_scale=2.5)
    )


def test_bounds_check_runs_inside_compiled_graph(backend):
    """The value check lives inside the op: a compiled graph still raises for bad ids, no graph break."""
    torch._dynamo.reset()
    fn = torch.compile(
        lambda ids, w, p: fastprompt.prompt_concat(ids, w, p) * 2, fullgraph=True, backend="aot_eager"
    )
    word, prompt = torch.randn(9, 6), torch.randn(4, 6)
    fn(torch.randint(0, 9, (2, 3)), word, prompt)
    with pytest.raises(IndexError, match="input_ids holds 9"):
        fn(torch.tensor([[0, 9, 1], [1, 1, 1]]), word, prompt)


def test_cuda_bounds_check_is_opt_in(monkeypatch):
    from fastprompt.ops.checks import bounds_check_requested

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("FASTPROMPT_CHECK_BOUNDS", raising=False)
    assert bounds_check_requested(cpu, False) and bounds_check_requested(cpu, None)
    assert not bounds_check_requested(cuda, None) and bounds_check_requested(cuda, True)
    monkeypatch.setenv("FASTPROMPT_CHECK_BOUNDS", "1")
    assert bounds_check_requested(cuda, None) and not bounds_check_requested(cuda, False)
