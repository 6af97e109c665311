"""Every kernel loop past its first iteration, under the interpreter, against a float64 reference.

The launchers take block overrides, so small shapes still run each loop several times: the forward's
D loop (D larger than BLOCK_D), the prompt gradient's batch loop (B larger than BLOCK_B), the segmented
backward's entry loop (segments longer than BLOCK_K), its chunk split (segments spanning chunks, the
finish pass summing several partials), and more than one D block in every backward kernel.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tolerance
from op_reference import assert_close_to_reference, poisoned_empty, reference_forward

pytest.importorskip("triton")

from fastprompt.kernels import batch_rows_sum, prompt_concat_forward, segment_rows_sum  # noqa: E402

B, L, V, P, D = 3, 9, 13, 6, 12


def _inputs(gen, word_dtype=torch.float32, prompt_dtype=torch.float32):
    ids = torch.randint(0, V, (B, L), generator=gen)
    word = torch.randn(V, D, generator=gen).to(word_dtype)
    prompt = torch.randn(P, D, generator=gen).to(prompt_dtype)
    return ids, word, prompt


def _reference_rows_sum(grad, col_start, index, num_rows, scale=None, zero_row=None):
    """[R, D] float64: row r = scale * sum of grad[b, col_start + c] over index[b, c] == r."""
    out = torch.zeros(num_rows, grad.shape[2], dtype=torch.float64)
    for b in range(index.shape[0]):
        for c in range(index.shape[1]):
            r = int(index[b, c])
            if 0 <= r < num_rows:
                out[r] += grad[b, col_start + c].double()
    if scale is not None:
        out *= float(scale)
    if zero_row is not None:
        out[zero_row] = 0
    return out


@pytest.mark.parametrize("mode", ["all", "shared", "per_batch"])
@pytest.mark.parametrize(
    ("block_r", "block_d", "dtypes"),
    [(2, 4, (torch.float32, torch.float32)), (1, 8, (torch.bfloat16, torch.float32))],
)
def test_forward_d_loop_and_row_blocks(mode, block_r, block_d, dtypes):
    gen = torch.Generator().manual_seed(block_r * 10 + block_d)
    ids, word, prompt = _inputs(gen, *dtypes)
    pidx = {
        "all": None,
        "shared": torch.tensor([5, 0, 2, 2]),
        "per_batch": torch.randint(0, P, (B, 4), generator=gen),
    }
    pidx = pidx[mode]
    num_prompt = P if pidx is None else pidx.shape[-1]
    out = torch.full((B, num_prompt + L, D), float("nan"), dtype=dtypes[0])  # poisoned
    prompt_concat_forward(ids, word, prompt, pidx, 1.5, out, block_r=block_r, block_d=block_d)
    assert_close_to_reference(out, reference_forward(ids, word, prompt, pidx, 1.5), tolerance(*dtypes))


@pytest.mark.parametrize(("block_b", "block_d"), [(2, 4), (4, 8)])
def test_batch_rows_sum_batch_loop_and_d_blocks(block_b, block_d):
    gen = torch.Generator().manual_seed(block_b)
    grad = torch.randn(5, P + L, D, generator=gen)  # B=5: several batch blocks, the last one partial
    with poisoned_empty():
        out = batch_rows_sum(grad, P, torch.float32, block_b=block_b, block_d=block_d)
    expected = grad[:, :P].double().sum(0)
    assert_close_to_reference(out, expected, tolerance(torch.float32), scale=5)


@pytest.mark.parametrize(
    ("block_k", "chunk", "block_d", "scale"),
    [(2, 4, 4, None), (4, 8, 8, 0.5), (4, 4, 16, "tensor"), (8, 64, 4, None)],
)
def test_segment_rows_sum_long_segments_span_chunks(block_k, chunk, block_d, scale):
    gen = torch.Generator().manual_seed(block_k * 100 + chunk)
    grad = torch.randn(B, P + L, D, generator=gen)
    ids = torch.randint(0, V, (B, L), generator=gen)
    ids[:, 2:] = 7  # a frequent id (a pad token without padding_idx): B*(L-2) entries, many chunks
    ids[0, 0], ids[1, 1] = -1, V + 3  # out of range: ignored
    scale_arg = torch.tensor(0.75) if scale == "tensor" else scale
    with poisoned_empty():
        out = segment_rows_sum(
            grad,
            P,
            ids,
            V,
            torch.float32,
            scale=scale_arg,
            zero_row=3,
            block_k=block_k,
            block_d=block_d,
            chunk=chunk,
        )
    expected = _reference_rows_sum(grad, P, ids, V, scale=scale_arg, zero_row=3)
    assert_close_to_reference(out, expected, tolerance(torch.float32), scale=B * L)
    assert torch.all(out[3] == 0)


def test_segment_rows_sum_is_deterministic_and_matches_across_chunkings():
    gen = torch.Generator().manual_seed(5)
    grad = torch.randn(4, 20, D, generator=gen).to(torch.bfloat16)
    index = torch.randint(0, 3, (4, 20), generator=gen)  # few rows: every segment is long
    runs = [segment_rows_sum(grad, 0, index, 3, torch.float32, chunk=8, block_k=2) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])  # bit-identical from run to run
    other = segment_rows_sum(grad, 0, index, 3, torch.float32, chunk=64)
    expected = _reference_rows_sum(grad, 0, index, 3)
    for out in (runs[0], other):
        assert_close_to_reference(out, expected, tolerance(torch.bfloat16), scale=80)


def test_chunking_splits_a_frequent_id_across_programs():
    from fastprompt.kernels.prompt_concat_bwd import chunk_size, segment_launches

    batch, seq = 32, 512
    entries = batch * seq  # one id everywhere: a single segment of all B*L entries
    meta = dict(device="meta", dtype=torch.int64)
    grad = torch.empty(batch, seq, 64, device="meta")
    out = torch.empty(100, 64, device="meta")
    index = [torch.empty(entries, **meta) for _ in range(2)]
    chunk_pass, finish_pass = segment_launches(
        grad, 0, seq, *index, torch.empty(101, **meta), out, interpret=False
    )
    chunk = chunk_pass.meta["CHUNK"]
    assert chunk == chunk_size(entries, chunk_pass.meta["BLOCK_K"]) and chunk <= 256
    assert chunk_pass.grid[0] * chunk >= entries and chunk_pass.grid[0] >= entries // 256  # many programs
    assert finish_pass.meta["CHUNK"] == chunk  # the finish pass sums at most entries / CHUNK partials
