"""Where users train with TRL: the 4-layer bench Llama (hidden 256, vocabulary 8000) prompt-tuned, N=100.

- A training step through TRL's fused LM head (``add_fused_lm_head`` on both base models, then
  ``fused_lm_head=True``) at (N, L, B) = (100, 64, 8), PEFT against fastprompt (the prompt shared at the
  decoder); first a check that fastprompt's first step gives PEFT's loss and prompt gradient.
- A packed training step: 8 documents of 16..128 tokens in one padding-free row (``fastprompt packed``),
  against PEFT on the same documents right-padded in a batch (``peft padded``) and the base model alone on
  the packed row (``no prompt packed``, the floor); first a check that the packed loss and prompt gradient
  equal the padded batch's.

The two ``test_*_matches`` tests are not benchmarks: ``pytest tests bench`` (CI) runs them on a small
batch, ``--benchmark-only`` skips them.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from fastprompt.benchmarks import shared_prefix, trl_packed
from fastprompt.benchmarks.measure import peak_extra_bytes
from fastprompt.prompt_once.policy import CALLS

needs_trl = pytest.mark.skipif(not trl_packed.trl_available(), reason="TRL is not installed")


@functools.lru_cache(maxsize=1)
def _base(device: torch.device):
    return shared_prefix.base_model().to(device)


@functools.lru_cache(maxsize=2)
def _fused_steps(device: torch.device, shape: tuple[int, int, int]) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps = trl_packed.fused_head_steps(_base(device), shape)
        matches = shared_prefix.first_step_matches(steps)
    assert all(matches.values()), f"{shape}: differs from PEFT's first step through the fused head: {matches}"
    return steps


@functools.lru_cache(maxsize=1)
def _packed_steps(device: torch.device) -> dict:
    base = _base(device)
    docs = trl_packed.documents(base.config.vocab_size, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps = trl_packed.packed_steps(base, docs)
        matches = trl_packed.packed_matches(steps, docs)
    assert all(matches.values()), f"packed rows differ from their references: {matches}"
    return steps


@needs_trl
def test_fused_head_step_matches_peft(device):
    """Small batch: fastprompt's step through TRL's fused head shares the prompt and equals PEFT's."""
    before = CALLS["shared"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps = trl_packed.fused_head_steps(_base(device), (20, 16, 8))
        out = steps["fastprompt"].outputs()
        assert type(out).__name__ == "FusedCausalLMOutput" and out.log_probs.shape == (8, 20 + 16 - 1)
        assert shared_prefix.first_step_matches(steps) == {"peft": True, "fastprompt": True}
    assert CALLS["shared"] > before


def test_packed_step_matches_padded_batch(device):
    """Small documents: the packed row's loss and prompt gradient equal PEFT's padded batch's (the prompt
    shared once for the row), and the no-prompt floor's equal the base model's padded batch's."""
    base = _base(device)
    docs = trl_packed.documents(base.config.vocab_size, count=3, lengths=(4, 12), seed=1, device=device)
    packed, padded = docs.packed(), docs.padded(base.config.pad_token_id)
    assert packed["input_ids"].shape == (1, sum(docs.lengths)) and padded["input_ids"].shape[0] == 3
    assert (
        int((packed["labels"] != -100).sum())
        == int((padded["labels"] != -100).sum())
        == sum(docs.lengths) - 3
    )
    before = CALLS["packed shared"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps = trl_packed.packed_steps(base, docs, num_virtual_tokens=5)
        matches = trl_packed.packed_matches(steps, docs)
    assert matches == dict.fromkeys(trl_packed.PACKED_PROVIDERS, True)
    assert CALLS["packed shared"] > before
    assert float(steps[trl_packed.PACKED]()) > 0  # a whole step runs (AdamW on the prompt)
    assert steps[trl_packed.FLOOR].optimizer is None


@needs_trl
@pytest.mark.parametrize("provider", shared_prefix.DEFAULT_PROVIDERS)
@pytest.mark.parametrize("shape", trl_packed.FUSED_SHAPES, ids=lambda s: "N{}-L{}-B{}".format(*s))
def test_train_step_trl_fused_head(benchmark, measure, record, device, shape, provider):
    step = _fused_steps(device, shape)[provider]
    peak = peak_extra_bytes(step, device)
    benchmark.group = "train step TRL fused head {} N={} L={} B={}".format(shared_prefix.MODEL_LABEL, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measure(step)
    record(
        peak=peak, model=shared_prefix.MODEL_LABEL, provider=provider, fused_outputs=trl_packed.FUSED_OUTPUTS
    )


@pytest.mark.parametrize("provider", trl_packed.PACKED_PROVIDERS)
def test_train_step_packed(benchmark, measure, record, device, provider):
    step = _packed_steps(device)[provider]
    peak = peak_extra_bytes(step, device)
    lengths = [len(ids) for ids in trl_packed.documents(_base(device).config.vocab_size).docs]
    benchmark.group = f"{shared_prefix.MODEL_LABEL} packed train step N={trl_packed.PACKED_PROMPT} {lengths}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measure(step)
    record(peak=peak, model=shared_prefix.MODEL_LABEL, provider=provider, document_lengths=lengths)
