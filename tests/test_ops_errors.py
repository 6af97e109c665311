"""Bad input gives a clear error (which argument, what was wrong, what is expected), on every backend."""

from __future__ import annotations

import pytest
import torch

import fastprompt
from fastprompt.ops.backend import _choose, backend_for, interpreter_enabled, load_kernels

V, P, D = 11, 4, 6


def _args(**overrides):
    args = dict(
        input_ids=torch.randint(0, V, (2, 5)),
        word_weight=torch.randn(V, D),
        prompt_weight=torch.randn(P, D),
        prompt_indices=None,
    )
    args.update(overrides)
    return args


def test_backend_fixture_selects_the_kernels(backend):
    expected = {"torch": "torch", "triton": "interpret"}[backend]
    assert backend_for("cpu") == expected
    assert backend_for(torch.device("cpu")) == expected


def test_backend_env_values(monkeypatch):
    monkeypatch.setenv("FASTPROMPT_BACKEND", "torch")
    assert backend_for("cuda") == "torch"
    monkeypatch.setenv("FASTPROMPT_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="FASTPROMPT_BACKEND='cudnn'.*'torch', 'triton'"):
        backend_for("cpu")
    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _choose("cpu", "triton", interpret=False)  # what a process without the interpreter gets
    if interpreter_enabled():  # the tests' kernels are interpreted: none compiles for CUDA
        with pytest.raises(RuntimeError, match="cannot run on device cuda"):
            backend_for("cuda")
    monkeypatch.delenv("FASTPROMPT_BACKEND")
    assert backend_for("cpu") == ("interpret" if interpreter_enabled() else "torch")


@pytest.mark.parametrize("later", ["0", "1", None])
def test_backend_follows_how_the_kernels_were_defined(monkeypatch, later):
    kernels = load_kernels()  # defined under TRITON_INTERPRET as conftest set it, before any import
    assert kernels.INTERPRETED is True
    if later is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", later)
    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")
    assert interpreter_enabled() is kernels.INTERPRETED
    assert backend_for("cpu") == "interpret"  # what the kernels will actually do, whatever the env says
    monkeypatch.setenv("FASTPROMPT_BACKEND", "")
    assert backend_for("cpu") == "interpret"
    out = fastprompt.prompt_concat(**_args())  # and the kernels do run, interpreted, on CPU tensors
    assert out.shape == (2, P + 5, D)


@pytest.mark.parametrize(
    ("bad_ids", "value", "position"),
    [
        (torch.tensor([[1, 2, V], [0, 0, 0]]), V, (0, 2)),
        (torch.tensor([[1, 2, 3], [0, -1, 0]]), -1, (1, 1)),
        (torch.tensor([[1, 2, 3], [0, 10**12, 0]]), 10**12, (1, 1)),
    ],
)
def test_input_ids_out_of_range(backend, bad_ids, value, position):
    with pytest.raises(IndexError) as err:
        fastprompt.prompt_concat(**_args(input_ids=bad_ids))
    message = str(err.value)
    assert "input_ids" in message and str(value) in message and str(position) in message
    assert f"{V} rows" in message and "word_weight" in message


@pytest.mark.parametrize("bad", [torch.tensor([0, P]), torch.tensor([[0, -2], [1, 1]])])
def test_prompt_indices_out_of_range(backend, bad):
    with pytest.raises(IndexError, match=rf"prompt_indices holds -?\d+ .*prompt_weight with {P} rows"):
        fastprompt.prompt_concat(**_args(prompt_indices=bad))


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        (dict(input_ids=torch.rand(2, 5)), TypeError, "input_ids must hold integer ids.*float32"),
        (dict(input_ids=torch.randint(0, V, (10,))), ValueError, r"input_ids must be a 2-D tensor \[B, L\]"),
        (dict(input_ids=[[1, 2]]), TypeError, "input_ids must be a torch.Tensor"),
        (dict(word_weight=torch.randint(0, 3, (V, D))), TypeError, "word_weight must be a floating-point"),
        (dict(prompt_weight=torch.randn(P, D).double()), TypeError, "prompt_weight .*float64"),
        (dict(word_weight=torch.randn(V, D, 1)), ValueError, r"word_weight must be a 2-D table \[rows, D\]"),
        (dict(prompt_weight=torch.randn(P, D + 1)), ValueError, "same embedding size D"),
        (dict(prompt_indices=torch.zeros(2, 2, 2, dtype=torch.long)), ValueError, "prompt_indices must be"),
        (dict(prompt_indices=torch.zeros(3, 2, dtype=torch.long)), ValueError, "one row per batch row.*B=2"),
        (dict(prompt_indices=torch.zeros(2, dtype=torch.float32)), TypeError, "prompt_indices must hold int"),
        (dict(word_weight=torch.empty(0)), ValueError, "0 elements.*ZeRO-3"),
        (dict(prompt_weight=torch.empty(0)), ValueError, "prompt_weight has shape.*0 elements.*ZeRO-3"),
        (dict(word_weight=torch.randn(V, D, device="meta")), ValueError, "all tensors on one device"),
    ],
)
def test_bad_arguments(backend, overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        fastprompt.prompt_concat(**_args(**overrides))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(padding_idx=V), ValueError, r"padding_idx=11 must be None or an int in \[-11, 11\)"),
        (dict(padding_idx=1.0), ValueError, "padding_idx=1.0"),
        (dict(padding_idx=True), ValueError, "padding_idx=True"),
        (dict(padding_idx=torch.tensor(1)), ValueError, "padding_idx=tensor"),
        (dict(embed_scale=torch.tensor(2)), ValueError, "one-element floating-point tensor.*int64"),
        (dict(embed_scale=torch.tensor(2.0, device="meta")), ValueError, "embed_scale on meta"),
        (dict(embed_scale="2"), TypeError, "embed_scale must be None, a float"),
        (dict(embed_scale=torch.ones(2)), ValueError, r"one-element floating-point tensor.*shape \(2,\)"),
    ],
)
def test_bad_keyword_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        fastprompt.prompt_concat(**_args(), **kwargs)


def test_negative_padding_idx_counts_from_the_end(backend):
    ids = torch.tensor([[V - 1, 0, V - 1]])
    word = torch.randn(V, D, requires_grad=True)
    fastprompt.prompt_concat(ids, word, torch.randn(P, D), padding_idx=-1).backward(torch.randn(1, P + 3, D))
    assert torch.all(word.grad[V - 1] == 0) and torch.any(word.grad[0] != 0)


def test_scale_tensor_is_accepted(backend):
    args = _args()
    for scale in (torch.tensor(2.0), torch.tensor([2.0]), torch.tensor([[2.0]], dtype=torch.float64)):
        out = fastprompt.prompt_concat(**args, embed_scale=scale)
        torch.testing.assert_close(out[:, P:], args["word_weight"][args["input_ids"]] * 2.0)


def test_torch_ops_entry_point_checks_too():
    with pytest.raises(ValueError, match="same embedding size D"):
        torch.ops.fastprompt.prompt_concat(
            torch.zeros(1, 1, dtype=torch.long),
            torch.randn(3, 4),
            torch.randn(2, 5),
            None,
            None,
            None,
            None,
            None,
        )


def test_kernel_never_reads_out_of_bounds_unchecked():
    """Unchecked (as on CUDA without the opt-in check), bad ids give NaN rows, never a stray read."""
    pytest.importorskip("triton")
    from fastprompt.kernels import prompt_concat_forward

    ids = torch.tensor([[1, V, -3, 2]])
    pidx = torch.tensor([[0, P + 5]])
    word, prompt = torch.randn(V, D), torch.randn(P, D)
    out = prompt_concat_forward(ids, word, prompt, pidx, None)
    assert torch.isnan(out[0, [1, 3, 4]]).all()
    torch.testing.assert_close(out[0, 0], prompt[0])
    torch.testing.assert_close(out[0, [2, 5]], word[[1, 2]])
