"""Training with the shared prompt prefix: one prompt-tuning step of a 4-layer Llama (hidden 256,
vocabulary 8000) at (N, L, B) = (100, 64, 8), (20, 128, 8), (8, 128, 2), (200, 256, 4), PEFT against
fastprompt (default ``share_prompt_prefix``: shares where it pays) and fastprompt without sharing.

Each shape first checks that every provider's first step gives PEFT's loss and prompt gradient. P-tuning
(MLP) and multitask prompt tuning steps at (100, 64, 8) and (8, 128, 2) the same way.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from fastprompt.benchmarks import shared_prefix
from fastprompt.benchmarks.measure import peak_extra_bytes


@functools.lru_cache(maxsize=1)
def _base(device: torch.device):
    return shared_prefix.base_model().to(device)


@functools.lru_cache(maxsize=4)
def _steps(device: torch.device, shape: tuple[int, int, int], method: str = shared_prefix.METHODS[0]) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps = shared_prefix.train_steps(_base(device), shape, shared_prefix.PROVIDERS, method=method)
        matches = shared_prefix.first_step_matches(steps)
    assert all(matches.values()), f"{method} {shape}: differs from PEFT's first step: {matches}"
    return steps


@pytest.mark.parametrize("provider", shared_prefix.PROVIDERS)
@pytest.mark.parametrize("shape", shared_prefix.SHAPES, ids=lambda s: "N{}-L{}-B{}".format(*s))
def test_train_step_shared_prefix(benchmark, measure, record, device, shape, provider):
    step = _steps(device, shape)[provider]
    peak = peak_extra_bytes(step, device)
    benchmark.group = "train step {} N={} L={} B={}".format(shared_prefix.MODEL_LABEL, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measure(step)
    record(peak=peak, model=shared_prefix.MODEL_LABEL, provider=provider)


@pytest.mark.parametrize("provider", shared_prefix.PROVIDERS)
@pytest.mark.parametrize("shape", shared_prefix.METHOD_SHAPES, ids=lambda s: "N{}-L{}-B{}".format(*s))
@pytest.mark.parametrize("method", shared_prefix.METHODS[1:])
def test_train_step_prompt_methods(benchmark, measure, record, device, method, shape, provider):
    """P-tuning (MLP encoder) and multitask prompt tuning: the same step, PEFT against fastprompt."""
    step = _steps(device, shape, method)[provider]
    peak = peak_extra_bytes(step, device)
    benchmark.group = "{} train step {} N={} L={} B={}".format(method, shared_prefix.MODEL_LABEL, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measure(step)
    record(peak=peak, model=shared_prefix.MODEL_LABEL, provider=provider)
