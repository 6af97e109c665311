"""Offsets are 64-bit: B*(T+L)*D and V*D past 2**31 must address the right elements.

Proofs that allocate no 2**31-element buffer in RAM:
- the address helper every kernel uses, run by the interpreter on row indices past 2**31;
- the real forward kernel reading a table row, and writing an output row, that sit more than 2**31
  elements from their tensor's start (strided views into a lazily allocated buffer: only the pages
  touched are mapped). With 32-bit offsets these read or write the wrong place, or crash.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from fastprompt.kernels.address import row_offset  # noqa: E402


@triton.jit
def _offsets_kernel(rows_ptr, out_ptr, stride, N: tl.constexpr):
    i = tl.arange(0, N)
    rows = tl.load(rows_ptr + i)  # int32 rows, as a program id or arange would give
    tl.store(out_ptr + i, row_offset(rows, stride))


@triton.jit
def _program_offset_kernel(out_ptr, stride):
    # A program id times a stride, as the kernels compute an output row's offset.
    pid = tl.program_id(0)
    tl.store(out_ptr + pid, row_offset(pid, stride))


def test_row_offset_is_int64_past_2_31():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    rows = torch.tensor([0, 1, 65_536, 2**31 - 1], dtype=torch.int32)
    stride = 1_000_003  # rows * stride overflows int32 for all but the first two
    out = torch.empty(4, dtype=torch.int64)
    _offsets_kernel[(1,)](rows, out, stride, N=4)
    assert out.tolist() == [r * stride for r in rows.tolist()]
    assert out[-1].item() > 2**31


def test_program_id_offset_is_int64():
    out = torch.empty(3, dtype=torch.int64)
    stride = 2**30 + 7  # program 2 * stride > 2**31
    _program_offset_kernel[(3,)](out, stride)
    assert out.tolist() == [0, stride, 2 * stride]


def test_forward_kernel_reads_a_row_past_2_31_elements():
    from fastprompt.kernels import prompt_concat_forward

    dim = 8
    stride = 2**30 + 8  # fits int32, so Triton passes it as i32
    far = 2 * stride  # element offset of row 2: past int32
    try:
        storage = torch.empty(far + dim, dtype=torch.float16)  # ~4 GiB of untouched virtual memory
    except RuntimeError as err:  # pragma: no cover - depends on the machine's overcommit policy
        pytest.skip(f"cannot reserve 4 GiB of virtual memory here: {err}")
    near_row = torch.arange(dim, dtype=torch.float16)
    far_row = -torch.arange(dim, dtype=torch.float16) - 1
    storage[:dim] = near_row
    storage[far : far + dim] = far_row
    table = storage.as_strided((3, dim), (stride, 1))  # row 2 is 2**31 + 16 elements in
    ids = torch.tensor([[2, 0, 2]], dtype=torch.int32)  # int32 ids: no int64 for free
    prompt = torch.randn(2, dim, dtype=torch.float16)
    out = prompt_concat_forward(ids, table, prompt, None, None)
    torch.testing.assert_close(out[0, 2:], torch.stack([far_row, near_row, far_row]), atol=0, rtol=0)


def test_forward_kernel_writes_a_row_past_2_31_elements():
    from fastprompt.kernels import prompt_concat_forward

    dim, seq_out = 8, 3
    stride_b = 2**30 + 8  # fits int32; batch row 2 starts 2**31 + 16 elements in
    try:
        storage = torch.empty(2 * stride_b + seq_out * dim, dtype=torch.float16)
    except RuntimeError as err:  # pragma: no cover - depends on the machine's overcommit policy
        pytest.skip(f"cannot reserve 4 GiB of virtual memory here: {err}")
    out = storage.as_strided((3, seq_out, dim), (stride_b, dim, 1))
    word = torch.randn(5, dim, dtype=torch.float16)
    prompt = torch.randn(2, dim, dtype=torch.float16)
    ids = torch.tensor([[0, 1], [2, 3], [4, 0]], dtype=torch.int32)
    pidx = torch.tensor([1], dtype=torch.int32)
    out.fill_(float("nan"))
    prompt_concat_forward(ids, word, prompt, pidx, None, out=out)
    expected = torch.cat((prompt[pidx].expand(3, -1, -1), word[ids.long()]), dim=1)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_forward_kernel_reads_columns_past_2_31_elements():
    """A column-major table whose D stride fits int32 but whose column offsets do not."""
    from fastprompt.kernels import prompt_concat_forward

    dim, col_stride = 3, 2**30 + 8  # column 2 of a row starts 2**31 + 16 elements in
    try:
        storage = torch.empty(2 * col_stride + 2, dtype=torch.float16)
    except RuntimeError as err:  # pragma: no cover - depends on the machine's overcommit policy
        pytest.skip(f"cannot reserve 4 GiB of virtual memory here: {err}")
    table = storage.as_strided((2, dim), (1, col_stride))  # [V=2, D=3], column-major
    for row in range(2):
        for col in range(dim):
            storage[row + col * col_stride] = 10 * row + col + 1
    out = prompt_concat_forward(
        torch.tensor([[1, 0]]), table, torch.zeros(1, dim, dtype=torch.float16), None, None
    )
    expected = torch.tensor([[0, 0, 0], [11, 12, 13], [1, 2, 3]], dtype=torch.float16)
    torch.testing.assert_close(out[0], expected, atol=0, rtol=0)


def test_backward_kernel_reads_gradient_rows_past_2_31_elements():
    from fastprompt.kernels import segment_rows_sum

    dim, seq = 4, 2
    stride_b = 2**30 + 8  # batch row 2 of the upstream gradient starts 2**31 + 16 elements in
    try:
        storage = torch.empty(2 * stride_b + seq * dim, dtype=torch.float16)
    except RuntimeError as err:  # pragma: no cover - depends on the machine's overcommit policy
        pytest.skip(f"cannot reserve 4 GiB of virtual memory here: {err}")
    grad = storage.as_strided((3, seq, dim), (stride_b, dim, 1))
    grad.copy_(torch.arange(3 * seq * dim, dtype=torch.float16).reshape(3, seq, dim))
    index = torch.tensor([[0], [1], [1]], dtype=torch.int32)  # column 1 of each batch row
    out = segment_rows_sum(grad, 1, index, 2, torch.float32)
    expected = torch.stack((grad[0, 1], grad[1, 1] + grad[2, 1])).float()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
