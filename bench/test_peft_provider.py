"""The ``peft`` provider is PEFT's own code path: its output equals the ``inputs_embeds`` a real
``PeftModel`` builds and hands to its base model (run by ``pytest bench``; skipped by
``--benchmark-only``, which keeps only the benchmarks)."""

from __future__ import annotations

import warnings

import torch

from fastprompt.testing.reference import peft_concat
from fastprompt.testing.tiny_models import load_base_model, prompt_tuned, token_batch

NUM_VIRTUAL_TOKENS = 6


def _peft_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = prompt_tuned(load_base_model("tiny-gpt2"), "peft", NUM_VIRTUAL_TOKENS)
    with torch.no_grad():  # a prompt table that is not the random init's: any row mix-up shows
        model.prompt_encoder["default"].embedding.weight.normal_()
    return model.eval()


def test_peft_provider_equals_peft_models_inputs_embeds():
    """PEFT's forward (``PeftModelForCausalLM.forward``: ``word_embeddings``, ``get_prompt``, cast,
    ``torch.cat``), captured where it enters the base model, equals ``peft_concat`` bit for bit; so
    does PEFT's own recipe spelled out with its methods."""
    model = _peft_model()
    ids = token_batch(model, 3, 9)
    captured = {}

    def capture(module, args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.base_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    word_weight = model.word_embeddings.weight
    prompt_weight = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        ours = peft_concat(ids, word_weight, prompt_weight, torch.arange(NUM_VIRTUAL_TOKENS))
        embeds = model.word_embeddings(ids)
        prompts = model.get_prompt(batch_size=ids.shape[0]).to(embeds.dtype)
        recipe = torch.cat((prompts, embeds), dim=1)
    assert ours.shape == (3, NUM_VIRTUAL_TOKENS + 9, word_weight.shape[1])
    torch.testing.assert_close(ours, captured["inputs_embeds"], rtol=0, atol=0)
    torch.testing.assert_close(ours, recipe, rtol=0, atol=0)
