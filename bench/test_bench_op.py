"""Op level: ``peft`` vs ``compile`` vs ``fastprompt``, forward and forward+backward, grouped by shape.

Forward+backward is prompt tuning's: the prompt table requires grad, the word table is frozen, the
upstream gradient is random. Each provider's result is checked against ``peft`` before it is timed.
"""

from __future__ import annotations

import functools

import pytest

from fastprompt.benchmarks import (
    PROVIDERS,
    SUITE_SHAPES,
    assert_matches_peft,
    bench_device,
    bytes_moved,
    device_kind,
    make_inputs,
    op_call,
    peak_extra_bytes,
)

SHAPES = SUITE_SHAPES[device_kind(bench_device())]


@functools.lru_cache(maxsize=1)
def _inputs(shape, device, backward):
    """One input set at a time: the providers of a shape share it (large tables take seconds to draw)."""
    return make_inputs(shape, device, backward=backward)


def _checked_call(shape, device, provider, backward):
    """The call to time, after its result was compared with ``peft``'s on the same inputs."""
    inputs = _inputs(shape, device, backward)
    assert_matches_peft(provider, inputs, backward=backward)
    return op_call(provider, inputs, backward=backward)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_op(benchmark, measure, record, device, backward, shape, provider):
    """Forward (``inputs_embeds = cat(prompts, word_embeddings(input_ids))``), or forward then backward
    of a random upstream gradient into the prompt table's gradient."""
    call = _checked_call(shape, device, provider, backward)
    peak = peak_extra_bytes(call, device)
    benchmark.group = f"{'forward+backward' if backward else 'forward'} {shape.title}"
    measure(call)
    record(
        nbytes=bytes_moved(shape, backward=backward),
        peak=peak,
        call=call,
        shape=shape.title,
        provider=provider,
    )
