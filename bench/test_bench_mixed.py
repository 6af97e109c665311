"""Mixed-adapter batches: K=4 adapters x 4 rows, forward and greedy generation, side by side with the
per-adapter loop a PEFT user must run today and with one adapter for the whole batch (the floor).

Each workload first checks that the mixed batch equals the per-adapter loop.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fastprompt.benchmarks import mixed
from fastprompt.benchmarks.measure import peak_extra_bytes
from fastprompt.testing.tiny_models import load_base_model


@functools.lru_cache(maxsize=1)
def _mixed(device: torch.device):
    return mixed.mixed_model(load_base_model("tiny-llama").to(device))


def _calls(device, workload: str):
    model = _mixed(device)
    batch = len(model.names)
    if workload == "forward":
        ids = mixed._token_batch(model.model, batch, mixed.FORWARD_LEN, 1)
        return mixed._calls(model, ids, mixed._forward)
    ids = mixed._token_batch(model.model, batch, mixed.GENERATE_LEN, 2)
    return mixed._calls(model, ids, mixed._greedy)


@pytest.mark.parametrize("provider", mixed.PROVIDERS)
@pytest.mark.parametrize("workload", ["forward", "generate"])
def test_mixed_batch(benchmark, measure, record, device, workload, provider):
    calls = _calls(device, workload)
    assert mixed._check(calls, exact=workload == "generate"), "the mixed batch differs from the loop"
    call = calls[provider]
    with torch.no_grad():
        peak = peak_extra_bytes(call, device)
    benchmark.group = f"mixed {workload} tiny-llama K={mixed.ADAPTERS}x{mixed.ROWS_PER_ADAPTER}"
    with torch.no_grad():
        measure(call)
    record(peak=peak, model="tiny-llama", provider=provider)
