"""Model level: a built-in tiny causal LM prompt-tuned by PEFT and by fastprompt, side by side.

One training step (forward with labels, backward, AdamW step on the prompt), the same step under bf16
autocast set on ``model.forward`` (as ``Trainer(bf16=True)`` does), and greedy generation.
Both models share the base weights and the prompt weights, and give the same logits (checked first).
Generation: fastprompt with its KV cache; PEFT with its cache where that is correct, without it on
transformers >= 5.24 (``peft_generation_uses_cache``; each result's ``extra_info`` says which).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from fastprompt.benchmarks.measure import peak_extra_bytes
from fastprompt.benchmarks.models import (
    MixedPrecisionStep,
    TrainStep,
    autocast_check,
    greedy_generate,
    peft_generation_uses_cache,
)
from fastprompt.testing.tiny_models import TINY_MODELS, load_base_model, prompt_tuned_pair, token_batch

NUM_VIRTUAL_TOKENS = 20
MODEL_PROVIDERS = ("peft", "fastprompt")


@functools.lru_cache(maxsize=1)
def _models(name: str, device: torch.device) -> dict:
    """{"peft": model, "fastprompt": model} for a tiny model, after a check that their logits agree."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_base_model(name).to(device)
        models = dict(zip(MODEL_PROVIDERS, prompt_tuned_pair(base, NUM_VIRTUAL_TOKENS), strict=True))
    ids = token_batch(models["peft"], 4, 32)
    with torch.no_grad():
        logits = [m.eval()(input_ids=ids).logits for m in models.values()]
    torch.testing.assert_close(logits[1], logits[0], msg=lambda m: f"{name}: fastprompt vs PEFT logits: {m}")
    return models


@pytest.mark.parametrize("provider", MODEL_PROVIDERS)
@pytest.mark.parametrize("model_name", sorted(TINY_MODELS))
def test_train_step(benchmark, measure, record, device, model_name, provider):
    """One prompt-tuning step, batch 8 x 64 tokens after 20 virtual tokens."""
    step = TrainStep(_models(model_name, device)[provider], batch=8, seq=64)
    peak = peak_extra_bytes(step, device)  # after a warm-up step: AdamW's state is not counted
    benchmark.group = f"train step {model_name} B=8 L=64 T={NUM_VIRTUAL_TOKENS}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measure(step)
    record(peak=peak, model=model_name, provider=provider)


@pytest.mark.parametrize("provider", MODEL_PROVIDERS)
@pytest.mark.parametrize("model_name", sorted(TINY_MODELS))
def test_train_step_bf16_autocast(benchmark, measure, record, device, model_name, provider):
    """One prompt-tuning step under bf16 autocast set on ``model.forward`` (``Trainer(bf16=True)``),
    batch 8 x 64 tokens after 20 virtual tokens; first a check that autocast reaches both base models."""
    models = _models(model_name, device)
    ok, detail = autocast_check(models, torch.bfloat16)
    assert ok, f"{model_name}: {detail}"
    step = MixedPrecisionStep(models[provider], batch=8, seq=64, dtype=torch.bfloat16)
    peak = peak_extra_bytes(step, device)
    benchmark.group = f"train step bf16 autocast {model_name} B=8 L=64 T={NUM_VIRTUAL_TOKENS}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measure(step)
    record(peak=peak, model=model_name, provider=provider, autocast="bf16")


@pytest.mark.parametrize("provider", MODEL_PROVIDERS)
@pytest.mark.parametrize("model_name", sorted(TINY_MODELS))
def test_generate(benchmark, measure, record, device, model_name, provider):
    """Greedy generation of 16 tokens, batch 2 x 16 prompt tokens after 20 virtual tokens."""
    model = _models(model_name, device)[provider]
    prompt = token_batch(model, 2, 16, seed=1)
    # PEFT's own cached generation is wrong on transformers >= 5.24: there PEFT is timed uncached
    use_cache, note = peft_generation_uses_cache() if provider == "peft" else (True, None)
    generate = functools.partial(greedy_generate, model, prompt, 16, use_cache=use_cache)
    peak = peak_extra_bytes(generate, device)
    benchmark.group = f"generate {model_name} 16 tokens B=2 L=16 T={NUM_VIRTUAL_TOKENS}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measure(generate)
    record(peak=peak, model=model_name, provider=provider, new_tokens=16, use_cache=use_cache, note=note)
