"""Generation through the fused op: CausalLM (cache handling on both sides of transformers' rename) and
Seq2Seq, against a correct reference.

The reference for CausalLM is PEFT with ``use_cache=False`` (prompts re-inserted over the full sequence
at every step, which is right): PEFT 0.21.2's cached path is wrong on transformers >= 5.24 because it
only reads the old ``past_key_values`` argument name.
"""

from __future__ import annotations

import pytest
import torch
from peft_helpers import FastpromptOps, model_pair

from fastprompt.testing import tiny_models

peft = pytest.importorskip("peft")

CAUSAL = ["gpt2", "llama", "opt", "gemma3"]
GREEDY = dict(max_new_tokens=5, do_sample=False, pad_token_id=tiny_models.PAD)
# the prompts-in-the-prefill path (prompt-KV reuse, on by default, has its own tests: test_prompt_kv*.py)
NO_REUSE = dict(GREEDY, reuse_prompt_kv=False)


@pytest.mark.parametrize("family", CAUSAL)
def test_greedy_left_padded_matches_reference(family):
    reference, fast = model_pair(family, "CAUSAL_LM")
    inputs = tiny_models.batch()
    expected = reference.generate(**inputs, use_cache=False, **GREEDY)
    with FastpromptOps() as ops:
        cached = fast.generate(**inputs, **NO_REUSE)
    assert ops.forward == 1  # prompts injected once, at prefill; the cache carries them afterwards
    assert torch.equal(cached, expected)
    # output sequences hold no virtual tokens
    assert cached.shape == (3, 6 + 5) and torch.equal(cached[:, :6], inputs["input_ids"])
    with FastpromptOps() as ops:
        uncached = fast.generate(**inputs, use_cache=False, **GREEDY)
    assert ops.forward == 5  # no cache: prompts + full sequence at every step, as PEFT
    assert torch.equal(uncached, expected)


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_triton_interpreter_generation(backend, family):
    reference, fast = model_pair(family, "CAUSAL_LM")
    inputs = tiny_models.batch()
    expected = reference.generate(**inputs, use_cache=False, **GREEDY)
    with FastpromptOps() as ops:
        assert torch.equal(fast.generate(**inputs, **NO_REUSE), expected)
    assert ops.forward == 1


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_beam_search_and_sampling(family):
    reference, fast = model_pair(family, "CAUSAL_LM")
    inputs = tiny_models.batch()
    beams = dict(GREEDY, num_beams=3, num_return_sequences=2)
    assert torch.equal(
        fast.generate(**inputs, **beams), reference.generate(**inputs, use_cache=False, **beams)
    )
    sampling = dict(max_new_tokens=5, do_sample=True, top_k=20, pad_token_id=tiny_models.PAD)
    torch.manual_seed(0)
    sampled = fast.generate(**inputs, **sampling)
    torch.manual_seed(0)
    assert torch.equal(sampled, reference.generate(**inputs, use_cache=False, **sampling))


def test_generate_scores_and_positional_input_ids():
    reference, fast = model_pair("gpt2", "CAUSAL_LM")
    inputs = tiny_models.batch(left_pad=False)
    ours = fast.generate(inputs["input_ids"], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, reference.generate(inputs["input_ids"], use_cache=False, **GREEDY)[:, :9])
    scores = fast.generate(**inputs, return_dict_in_generate=True, output_scores=True, **GREEDY).scores
    ref_scores = reference.generate(
        **inputs, return_dict_in_generate=True, output_scores=True, use_cache=False, **GREEDY
    ).scores
    for a, b in zip(scores, ref_scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_generation():
    reference, fast = model_pair("llama", "CAUSAL_LM", dtype=torch.bfloat16)
    inputs = tiny_models.batch()
    with FastpromptOps() as ops:
        out = fast.generate(**inputs, **NO_REUSE)
    assert ops.forward == 1 and out.shape == (3, 11)
    first_ref = reference.generate(
        **inputs, use_cache=False, max_new_tokens=1, do_sample=False, pad_token_id=0
    )
    assert torch.equal(out[:, :7], first_ref)


def test_disable_adapter_generates_like_the_base_model():
    reference, fast = model_pair("gpt2", "CAUSAL_LM")
    inputs = tiny_models.batch()
    base = tiny_models.build("gpt2", "CAUSAL_LM")
    expected = base.generate(**inputs, **GREEDY)
    with fast.disable_adapter(), FastpromptOps() as ops:
        assert torch.equal(fast.generate(**inputs, **GREEDY), expected)
        assert torch.equal(fast(**inputs).logits, base(**inputs).logits)
    assert ops.names == []
    with FastpromptOps() as ops:
        fast.generate(**inputs, **NO_REUSE)
    assert ops.forward == 1  # enabled again afterwards


@pytest.mark.parametrize("cache_key", ["cache", "past_key_values"])
def test_prepare_inputs_reads_either_cache_name(cache_key):
    """transformers < 5.24 passes ``past_key_values``, >= 5.24 ``cache``: both are honoured."""
    from transformers import DynamicCache

    from fastprompt.integrations.peft_generate import causal_lm_prepare_inputs_for_generation

    _, fast = model_pair("gpt2", "CAUSAL_LM")
    input_ids = torch.randint(4, 100, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)

    def fake_base_prepare(input_ids, **kwargs):  # what the base model's prepare returns, cache included
        return {"input_ids": input_ids, **kwargs}

    fast.base_model_prepare_inputs_for_generation = fake_base_prepare
    # an empty cache: prefill, prompts injected
    empty = DynamicCache()
    prefill = causal_lm_prepare_inputs_for_generation(
        fast, (input_ids,), {cache_key: empty, "attention_mask": mask}
    )
    assert prefill["input_ids"] is None and prefill["inputs_embeds"].shape == (2, 3 + 5, tiny_models.HIDDEN)
    assert prefill["attention_mask"].shape == (2, 8)
    # a filled cache: only the last token, no prompts
    filled = DynamicCache()
    key = torch.zeros(2, 2, 3 + 5, 8)
    filled.update(key, key, 0)
    filled.update(key, key, 1)
    step = causal_lm_prepare_inputs_for_generation(
        fast, (torch.cat([input_ids, input_ids[:, :1]], 1),), {cache_key: filled, "attention_mask": mask}
    )
    assert "inputs_embeds" not in step and step["input_ids"].shape == (2, 1)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_generate(family):
    reference, fast = model_pair(family, "SEQ_2_SEQ_LM")
    inputs = tiny_models.batch()
    kwargs = dict(max_new_tokens=5, do_sample=False)
    with FastpromptOps() as ops:
        out = fast.generate(**inputs, **kwargs)
    assert ops.forward == 1
    assert torch.equal(out, reference.generate(**inputs, **kwargs))
    beams = dict(kwargs, num_beams=2)
    assert torch.equal(fast.generate(**inputs, **beams), reference.generate(**inputs, **beams))
    with pytest.raises(ValueError, match="input_ids must be provided"):
        fast.generate(inputs_embeds=torch.zeros(1, 2, tiny_models.HIDDEN))
    # the base model's prepare_inputs_for_generation is restored
    assert fast.base_model.prepare_inputs_for_generation == fast.base_model_prepare_inputs_for_generation


def test_seq2seq_generate_reuse_prompt_kv_is_fastprompts_own_error():
    reference, fast = model_pair("t5", "SEQ_2_SEQ_LM")
    inputs = tiny_models.batch()
    kwargs = dict(max_new_tokens=3, do_sample=False)
    with pytest.raises(ValueError, match="reuse_prompt_kv=True applies to CausalLM generation only"):
        fast.generate(**inputs, **kwargs, reuse_prompt_kv=True)
    with pytest.raises(TypeError, match="reuse_prompt_kv must be True, False or None"):
        fast.generate(**inputs, **kwargs, reuse_prompt_kv="yes")
    expected = reference.generate(**inputs, **kwargs)
    assert torch.equal(fast.generate(**inputs, **kwargs, reuse_prompt_kv=False), expected)  # nothing to reuse


@pytest.mark.parametrize("reuse", [True, False])
def test_generation_warns_of_no_position_ids_it_made_itself(reuse, recwarn):
    """generate() builds position ids itself at every step: dropping them (as PEFT does) is no warning."""
    _, fast = model_pair("llama", "CAUSAL_LM")
    inputs = tiny_models.batch()
    fast.generate(**inputs, max_new_tokens=3, do_sample=False, reuse_prompt_kv=reuse)
    assert not [w for w in recwarn if "Position ids" in str(w.message)]
