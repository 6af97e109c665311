"""Generation with prompt-KV reuse: reuse on, reuse off, ``peft`` and the no-prompt floor.

B = 8 rows of L = 16 tokens, greedy, 8 new tokens (``generate``) and 1 (``first token``), N in {20, 100},
on ``tiny-llama`` and ``mid-llama`` (4 layers, D = 1024): the workload of
``fastprompt.benchmarks.prompt_kv``. ``reuse`` is checked to give ``no reuse``'s tokens first; its prompt
KV is stored by that first call (the steady state of serving an adapter). pytest-benchmark runs one
benchmark after the other: for ratios on a shared machine prefer
``python -m fastprompt.benchmarks.prompt_kv``,
where the providers take turns.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fastprompt.benchmarks.measure import peak_extra_bytes
from fastprompt.benchmarks.prompt_kv import (
    NEW_TOKENS,
    NUM_VIRTUAL_TOKENS,
    PROVIDERS,
    base_model,
    generate_calls,
    input_batch,
    workload_models,
)


@functools.lru_cache(maxsize=2)
def _workload(model_name: str, num_virtual_tokens: int, device: torch.device):
    base = base_model(model_name).to(device).requires_grad_(False)
    models = workload_models(base, num_virtual_tokens)
    input_ids = input_batch(base)
    calls = generate_calls(models, input_ids, 1)
    assert torch.equal(calls["reuse"](), calls["no reuse"]()), f"{model_name} T={num_virtual_tokens}"
    return models, input_ids


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("new_tokens", [NEW_TOKENS, 1])
@pytest.mark.parametrize("num_virtual_tokens", NUM_VIRTUAL_TOKENS)
@pytest.mark.parametrize("model_name", ["tiny-llama", "mid-llama"])
def test_generate_prompt_kv(
    benchmark, measure, record, device, model_name, num_virtual_tokens, new_tokens, provider
):
    """Greedy generation, B=8, L=16, after N virtual tokens; ``new_tokens=1``: time to the first token."""
    models, input_ids = _workload(model_name, num_virtual_tokens, device)
    call = generate_calls(models, input_ids, new_tokens)[provider]
    peak = peak_extra_bytes(call, device)
    kind = "generate" if new_tokens > 1 else "first token"
    benchmark.group = f"prompt KV {kind} {model_name} {new_tokens} tok B=8 L=16 T={num_virtual_tokens}"
    measure(call)
    record(peak=peak, model=model_name, provider=provider, num_virtual_tokens=num_virtual_tokens)
