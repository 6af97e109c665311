"""Prefix tuning's training step: a 4-layer Llama (hidden 256, vocabulary 8000) at (N, L, B) = (30, 64, 8),
without and with ``prefix_projection``, PEFT against fastprompt (the encoder once per batch, its keys/values
in the model's own cache). Each first checks that fastprompt's first step gives PEFT's loss and gradient."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from fastprompt.benchmarks import prefix_tuning, shared_prefix
from fastprompt.benchmarks.measure import peak_extra_bytes


@functools.lru_cache(maxsize=1)
def _base(device: torch.device):
    return shared_prefix.base_model().to(device)


@functools.lru_cache(maxsize=2)
def _steps(device: torch.device, shape: tuple[int, int, int], projection: bool) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps = prefix_tuning.train_steps(_base(device), shape, projection=projection)
        matches = shared_prefix.first_step_matches(steps)
    assert all(matches.values()), f"prefix tuning {shape}: differs from PEFT's first step: {matches}"
    return steps


@pytest.mark.parametrize("provider", prefix_tuning.PROVIDERS)
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "mlp"])
@pytest.mark.parametrize("shape", prefix_tuning.SHAPES, ids=lambda s: "N{}-L{}-B{}".format(*s))
def test_train_step_prefix_tuning(benchmark, measure, record, device, shape, projection, provider):
    step = _steps(device, shape, projection)[provider]
    peak = peak_extra_bytes(step, device)
    n, length, batch = shape
    mlp = " mlp" if projection else ""
    benchmark.group = f"prefix tuning{mlp} train step {shared_prefix.MODEL_LABEL} N={n} L={length} B={batch}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measure(step)
    record(peak=peak, model=shared_prefix.MODEL_LABEL, provider=provider)
