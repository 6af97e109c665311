"""Prefix tuning on fastprompt's prompt-once machinery, against PEFT 0.21.2's definition.

The reference is PEFT's own ``PeftModelForCausalLM`` (never patched here): its training forward is right on
both sides of transformers 5.24 (it passes ``past_key_values``, still accepted). Its generation is not on
5.24, so generation is compared with greedy decoding of each row alone, unpadded, recomputing the whole
sequence at every step through PEFT's forward (a fresh length-N prefix cache each time).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastprompt
from fastprompt.prompt_once import prefix_kv
from fastprompt.testing.causal_lms import EOS, PAD, VOCAB, tiny_causal_lm

peft = pytest.importorskip("peft")

FAMILIES = ["llama", "qwen3", "gemma2", "mixtral", "gpt_oss", "phi3", "gpt2", "opt", "mistral", "gemma3_text"]
N = 10


def prefix_config(n: int = N, projection: bool = False, **kwargs):
    return peft.PrefixTuningConfig(
        task_type=kwargs.pop("task_type", "CAUSAL_LM"),
        num_virtual_tokens=n,
        prefix_projection=projection,
        encoder_hidden_size=kwargs.pop("encoder_hidden_size", 24),
        **kwargs,
    )


def prefix_pair(model_type: str, *, projection: bool = False, n: int = N, seed: int = 0, **overrides):
    """(PEFT model, fastprompt model): the same base and prefix-encoder weights."""
    base = tiny_causal_lm(model_type, seed=seed, **overrides)
    torch.manual_seed(seed + 1)
    reference = peft.get_peft_model(copy.deepcopy(base), prefix_config(n, projection))
    fast = fastprompt.get_peft_model(copy.deepcopy(base), prefix_config(n, projection))
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def batch(seed: int = 0, rows: int = 3, length: int = 7):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    if rows > 2:
        mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def trainable(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def step(model, ids, mask, labels, **kwargs):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    upstream = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(5))
    (out.loss + (out.logits * upstream).sum() * 1e-2).backward()
    return out, {name: p.grad.clone() for name, p in trainable(model).items()}


def assert_same_step(reference, fast, *, atol=2e-5, **kwargs):
    ids, mask, labels = batch()
    ref_out, ref_grads = step(reference, ids, mask, labels)
    fast_out, fast_grads = step(fast, ids, mask, labels, **kwargs)
    torch.testing.assert_close(fast_out.loss, ref_out.loss, atol=atol, rtol=1e-5)
    torch.testing.assert_close(fast_out.logits, ref_out.logits, atol=atol, rtol=1e-5)
    assert ref_grads.keys() == fast_grads.keys() and ref_grads
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], atol=atol, rtol=1e-4, msg=name)


class EncoderCalls:
    """Counts the prefix encoder's forward calls and their batch sizes."""

    def __init__(self, model, name="default"):
        self.sizes = []
        self.handle = model.prompt_encoder[name].register_forward_hook(
            lambda module, args, out: self.sizes.append(args[0].shape[0])
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_train_step_equals_peft(model_type, projection):
    reference, fast = prefix_pair(model_type, projection=projection)
    with EncoderCalls(fast) as calls:
        assert_same_step(reference, fast)
    assert calls.sizes == [1]  # once per adapter per batch, not once per row


def test_cache_is_the_models_own_and_holds_the_prefix_once():
    reference, fast = prefix_pair("gemma2")
    ids, mask, _ = batch()
    with torch.no_grad():
        out = fast(input_ids=ids, attention_mask=mask, use_cache=True)
    kinds = [type(layer).__name__ for layer in out.past_key_values.layers]
    assert kinds == ["DynamicSlidingWindowLayer", "DynamicLayer"] * 2  # DynamicCache(config=...)
    assert out.past_key_values.get_seq_length(1) == N + ids.shape[1]


def test_position_ids_are_shifted_as_peft_does():
    reference, fast = prefix_pair("llama")
    ids, mask, labels = batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        actual = fast(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(actual, expected)


def test_inference_mode_adapter_uses_the_stored_rows(tmp_path):
    reference, fast = prefix_pair("llama", projection=True)
    reference.save_pretrained(tmp_path)
    base = tiny_causal_lm("llama")
    loaded_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with fastprompt.patched_peft() if hasattr(fastprompt, "patched_peft") else _patched():
        loaded_fast = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        ids, mask, _ = batch()
        with torch.no_grad():
            expected = loaded_peft(input_ids=ids, attention_mask=mask).logits
            actual = loaded_fast(input_ids=ids, attention_mask=mask).logits
            trained = reference.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual, trained, atol=1e-5, rtol=1e-5)  # the projection folded in


class _patched:
    def __enter__(self):
        fastprompt.patch_peft()

    def __exit__(self, *exc):
        fastprompt.unpatch_peft()


def test_accelerate_and_patch_peft_route_prefix_tuning():
    reference, _ = prefix_pair("qwen3")
    fast = fastprompt.accelerate(copy.deepcopy(reference))
    assert isinstance(fast, fastprompt.integrations.peft_methods.FastPromptModel)
    assert_same_step(reference, fast)
    with _patched():
        patched = copy.deepcopy(reference)
        with EncoderCalls(patched) as calls:
            assert_same_step(reference, patched)
        assert calls.sizes == [1]


def test_share_prompt_prefix_is_accepted_and_changes_nothing():
    reference, fast = prefix_pair("llama")
    assert_same_step(reference, fast, share_prompt_prefix=True)
    with pytest.raises((TypeError, ValueError)):
        fast(input_ids=batch()[0], share_prompt_prefix="yes")


def test_unread_cache_is_a_clear_error():
    _, fast = prefix_pair("llama")
    base = fast.get_base_model()
    original = type(base.model).forward

    def forward(self, *args, **kwargs):  # a model of its own making: its layers get no cache
        kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
        return original(self, *args, **kwargs)

    base.model.forward = forward.__get__(base.model)
    ids = batch()[0]
    with pytest.raises((prefix_kv.PrefixTuningError, RuntimeError)):
        fast(input_ids=ids)


# ------------------------------------------------------------------------------------------- generation

NEW_TOKENS = 5
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD)


def greedy_reference(reference, ids, mask, adapter=None) -> torch.Tensor:
    """Each row alone, unpadded, the whole sequence recomputed at every step through PEFT's forward (a
    fresh length-N prefix cache each time): ``[B, NEW_TOKENS]``."""
    reference.eval()
    if adapter is not None:
        reference.set_adapter(adapter)
    rows = []
    with torch.no_grad():
        for row, row_mask in zip(ids, mask, strict=True):
            sequence = row[row_mask.bool()][None]
            done = False
            for _ in range(NEW_TOKENS):
                if done:  # generate pads a row after its EOS
                    token = torch.tensor([[PAD]])
                else:
                    token = reference(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)
                done = done or token.item() == EOS
                sequence = torch.cat((sequence, token), dim=1)
            rows.append(sequence[0, -NEW_TOKENS:])
    return torch.stack(rows)


# A sliding window counts the left padding's slots, and Phi-3's LongRoPE picks its factor from the padded
# length: there the base model's own batched generation differs from a row alone. Those families are
# compared alone with a window wider than the sequences; all are compared with the padded batch recomputed.
WIDE_WINDOW = {
    name: {"sliding_window": 64} for name in ("qwen3", "mixtral", "gpt_oss", "mistral", "gemma3_text")
}
ALONE = [name for name in FAMILIES if name != "phi3"]


def padded_reference(reference, ids, mask) -> torch.Tensor:
    """The left-padded batch, the whole sequence recomputed at every step through PEFT's forward with the
    positions ``generate`` gives (from the mask; PEFT shifts them by N): ``[B, NEW_TOKENS]``."""
    reference.eval()
    sequence = ids
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = reference(input_ids=sequence, attention_mask=mask, position_ids=positions).logits
            sequence = torch.cat((sequence, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return sequence[:, ids.shape[1] :]


def fast_generate(fast, ids, mask, **kwargs):
    fast.eval()
    with torch.no_grad(), EncoderCalls(fast) as calls:
        generated = fast.generate(input_ids=ids, attention_mask=mask, **GREEDY, **kwargs)
    repeats = generated.shape[0] // ids.shape[0]
    assert torch.equal(generated[:, : ids.shape[1]], ids.repeat_interleave(repeats, 0))  # no virtual tokens
    return generated[:, ids.shape[1] :], calls.sizes


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("model_type", ALONE)
def test_greedy_generation_equals_each_row_alone(model_type, projection):
    reference, fast = prefix_pair(model_type, projection=projection, **WIDE_WINDOW.get(model_type, {}))
    ids, mask, _ = batch()
    generated, sizes = fast_generate(fast, ids, mask)
    assert torch.equal(generated, greedy_reference(reference, ids, mask))
    assert sizes == [1]  # the prefix is put in once, at the prefill, never at a decoding step


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_generation_equals_recomputing_the_padded_batch(model_type, projection):
    reference, fast = prefix_pair(model_type, projection=projection)
    ids, mask, _ = batch()
    generated, sizes = fast_generate(fast, ids, mask)
    assert torch.equal(generated, padded_reference(reference, ids, mask))
    assert sizes == [1]


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("model_type", ["gemma4_text", "gemma3n_text"])
def test_per_layer_shapes_and_kv_shared_layers(model_type, projection):
    """Gemma 4 (sliding layers of head_dim 16, full layers of 32): PEFT provisions the prefix for the widest
    layer and each layer takes the leading heads / width it needs. Gemma 3n (KV-shared layers): those read
    their source layer's prefix, their own slices stay unused. Train step equal to PEFT's; greedy generation
    equal to each row alone."""
    reference, fast = prefix_pair(model_type, projection=projection, sliding_window=64)
    assert_same_step(reference, fast)
    ids, mask, _ = batch()
    generated, sizes = fast_generate(fast, ids, mask)
    assert torch.equal(generated, greedy_reference(reference, ids, mask))
    assert sizes == [1]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_generation_without_cache_equals_the_reference(model_type):
    reference, fast = prefix_pair(model_type)
    ids, mask, _ = batch()
    generated, sizes = fast_generate(fast, ids, mask, use_cache=False)
    assert torch.equal(generated, greedy_reference(reference, ids, mask))
    assert sizes == [1] * NEW_TOKENS  # no cache: a fresh prefix at every step


def test_beams_with_and_without_cache_agree():
    _, fast = prefix_pair("llama")
    ids, mask, _ = batch()
    beams = dict(num_beams=3, num_return_sequences=2)
    cached, _ = fast_generate(fast, ids, mask, **beams)
    uncached, _ = fast_generate(fast, ids, mask, use_cache=False, **beams)
    assert cached.shape == (6, NEW_TOKENS) and torch.equal(cached, uncached)


# ---------------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("model_type", ["llama", "gemma2", "opt", "gpt2"])
def test_gradient_checkpointing_equals_peft_without_it(model_type, reentrant):
    reference, fast = prefix_pair(model_type, projection=True)
    fast.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    ids, mask, labels = batch()
    ref_out, ref_grads = step(reference, ids, mask, labels)
    fast_out, fast_grads = step(fast, ids, mask, labels)
    torch.testing.assert_close(fast_out.loss, ref_out.loss)
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_get_peft_model_lifts_peft_refusal_under_checkpointing():
    base = tiny_causal_lm("llama")
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        peft.get_peft_model(copy.deepcopy(base), prefix_config())
    reference, _ = prefix_pair("llama")
    fast = fastprompt.get_peft_model(base, prefix_config())
    assert fast.get_base_model().is_gradient_checkpointing
    fast.load_state_dict(reference.state_dict())
    assert_same_step(reference, fast)


def test_patch_peft_lifts_pefts_refusal_under_checkpointing():
    """``patch_peft()`` then PEFT's own ``get_peft_model`` on a checkpointed model: the adapter is added
    (PEFT refuses) and a train step equals PEFT's without checkpointing."""
    reference, _ = prefix_pair("llama", projection=True)
    base = tiny_causal_lm("llama")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with _patched():
        model = peft.get_peft_model(base, prefix_config(projection=True))
        assert model.get_base_model().is_gradient_checkpointing
        model.load_state_dict(reference.state_dict())
        assert_same_step(reference, model)
    with pytest.raises(ValueError, match="does not work with gradient checkpointing"):
        peft.get_peft_model(copy.deepcopy(base), prefix_config())  # unpatched: PEFT's refusal stands
    accelerated = fastprompt.get_peft_model(copy.deepcopy(base), prefix_config())
    accelerated.add_adapter("b", prefix_config())  # an accelerated model's add_adapter: lifted too
    assert "b" in accelerated.peft_config


@pytest.mark.parametrize("model_type", ["lfm2", "qwen3_next", "mamba2"])
def test_hybrid_models_are_refused_when_the_adapter_is_added(model_type):
    """A hybrid or state-space model's recurrent / convolution cache layers cannot take a key/value prefix:
    refused at ``get_peft_model`` (fastprompt's, and PEFT's under ``patch_peft()``) and at ``accelerate``,
    with the reason; PEFT itself fails at the first forward (or, on Mamba-2, ignores the prefix)."""
    base = tiny_causal_lm(model_type)
    with pytest.raises(prefix_kv.PrefixTuningError, match="recurrent or convolution state"):
        fastprompt.get_peft_model(copy.deepcopy(base), prefix_config())
    with _patched(), pytest.raises(prefix_kv.PrefixTuningError, match="recurrent or convolution state"):
        peft.get_peft_model(copy.deepcopy(base), prefix_config())
    model = peft.get_peft_model(copy.deepcopy(base), prefix_config())
    with pytest.raises(prefix_kv.PrefixTuningError, match="adapter 'default'.*hybrid model"):
        fastprompt.accelerate(model)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2"])
def test_bf16_autocast_step_equals_peft(model_type):
    """A train step under ``torch.autocast("cpu", torch.bfloat16)`` (what ``Trainer(bf16=True)`` does): the
    prefix is cast to the model's dtype as PEFT does and the layers run in bf16; loss and every gradient
    equal PEFT's under the same autocast within bf16 rounding."""
    reference, fast = prefix_pair(model_type, projection=True)
    ids, mask, labels = batch()
    results = []
    for model in (reference, fast):
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in trainable(model).items()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1.6e-2, rtol=1.6e-2)
    for name, grad in results[0][1].items():
        scale = grad.abs().max()
        assert (results[1][1][name] - grad).abs().max() <= 2e-2 * scale + 1e-6, name


# ------------------------------------------------------------------------------------------ mixed adapters


def two_adapter_pair(model_type="llama", n_b: int = N):
    reference, fast = prefix_pair(model_type, projection=True)
    torch.manual_seed(7)
    reference.add_adapter("b", prefix_config(n_b))
    fast.add_adapter("b", prefix_config(n_b))
    fast.load_state_dict(reference.state_dict())
    return reference, fast


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_adapter_names_rows_equal_their_adapter_alone(model_type):
    reference, fast = two_adapter_pair(model_type)
    ids, mask, labels = batch()
    names = ["b", "default", "b"]
    reference.eval(), fast.eval()
    with EncoderCalls(fast, "default") as calls_a, EncoderCalls(fast, "b") as calls_b:
        mixed = fast(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    assert calls_a.sizes == [1] and calls_b.sizes == [1]
    with torch.no_grad():
        for row, name in enumerate(names):
            reference.set_adapter(name)
            alone = reference(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=2e-5, rtol=1e-5)
    generated, _ = fast_generate(fast, ids, mask, adapter_names=names)
    for row, name in enumerate(names):
        reference.set_adapter(name)
        assert torch.equal(
            generated[row], greedy_reference(reference, ids[row : row + 1], mask[row : row + 1])[0]
        )


def test_adapter_names_gradients_reach_each_adapter():
    reference, fast = two_adapter_pair()
    ids, mask, labels = batch()
    names = ["b", "default", "b"]
    fast.train()
    fast(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names).loss.backward()
    expected = {}
    for rows, name in (([0, 2], "b"), ([1], "default")):
        reference.set_adapter(name)
        reference.train()
        reference.zero_grad(set_to_none=True)
        out = reference(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows])
        count = (labels[rows][:, 1:] != -100).sum()
        (out.loss * count / (labels[:, 1:] != -100).sum()).backward()
        expected.update({n: p.grad.clone() for n, p in reference.named_parameters() if f".{name}." in n})
    for name, grad in expected.items():
        torch.testing.assert_close(dict(fast.named_parameters())[name].grad, grad, atol=2e-5, rtol=1e-4)


def test_adapter_names_with_different_n_is_a_clear_error():
    _, fast = two_adapter_pair(n_b=4)
    ids, mask, _ = batch()
    with pytest.raises(ValueError, match="different num_virtual_tokens"):
        fast(input_ids=ids, attention_mask=mask, adapter_names=["b", "default", "b"])
    with pytest.raises(ValueError, match="not an adapter"):
        fast(input_ids=ids, attention_mask=mask, adapter_names=["x", "default", "b"])
    with pytest.raises(ValueError, match="one adapter name per batch row"):
        fast(input_ids=ids, attention_mask=mask, adapter_names=["default"])


# --------------------------------------------------------------------------------------------- packed rows


def packed_batch(row_lengths=((4, 6, 3), (5, 2)), seed: int = 0, pads: int = 2):
    """Packed rows (TRL's padding-free layout: position_ids restarting per document, no mask), padded to one
    length with single-token pad "documents" (position 0, the pad token, label -100), and each row's
    documents as (row, start, end)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(sum(lengths) for lengths in row_lengths) + pads
    ids = torch.full((len(row_lengths), width), PAD)
    positions = torch.zeros(len(row_lengths), width, dtype=torch.long)
    labels = torch.full((len(row_lengths), width), -100)
    documents = []
    for row, lengths in enumerate(row_lengths):
        start = 0
        for length in lengths:
            ids[row, start : start + length] = torch.randint(3, VOCAB, (length,), generator=generator)
            positions[row, start : start + length] = torch.arange(length)
            labels[row, start : start + length] = ids[row, start : start + length]
            documents.append((row, start, start + length))
            start += length
    return ids, positions, labels, documents


def alone_step(reference, ids, labels, documents, names=None):
    """Each document alone through PEFT: (its logits, the summed loss over every predicted token / their
    count, the gradients of that loss)."""
    reference.train()
    reference.zero_grad(set_to_none=True)
    count = sum(int((labels[row, start + 1 : end] != -100).sum()) for row, start, end in documents)
    logits, total = [], 0.0
    for row, start, end in documents:
        if names is not None:
            reference.set_adapter(names[row])
        out = reference(input_ids=ids[row : row + 1, start:end], labels=labels[row : row + 1, start:end])
        k = int((labels[row, start + 1 : end] != -100).sum())
        (out.loss * k / count).backward()
        logits.append(out.logits[0])
        total = total + out.loss.detach() * k / count
    return logits, total, {name: p.grad.clone() for name, p in trainable(reference).items()}


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize(
    "model_type", ["llama", "qwen3", "gemma2", "gpt2", "opt", "mixtral", "gpt_oss", "gemma3_text", "mistral"]
)
def test_packed_rows_equal_each_document_alone(model_type, projection):
    """Each document sees the prefix and its own tokens only, at positions N + its own: logits, loss and
    every gradient equal the documents run alone through PEFT (the first label of each document is not
    -100 here: alone, nothing predicts it, so it counts nowhere)."""
    reference, fast = prefix_pair(model_type, projection=projection, **WIDE_WINDOW.get(model_type, {}))
    ids, positions, labels, documents = packed_batch()
    expected_logits, expected_loss, expected_grads = alone_step(reference, ids, labels, documents)
    fast.train()
    fast.zero_grad(set_to_none=True)
    with EncoderCalls(fast) as calls:
        out = fast(input_ids=ids, position_ids=positions, labels=labels)
    out.loss.backward()
    assert calls.sizes == [1]
    assert out.logits.shape == (*ids.shape, VOCAB)
    torch.testing.assert_close(out.loss, expected_loss, atol=2e-5, rtol=1e-5)
    for (row, start, end), logits in zip(documents, expected_logits, strict=True):
        torch.testing.assert_close(out.logits[row, start:end], logits, atol=2e-5, rtol=1e-5)
    for name, param in trainable(fast).items():
        torch.testing.assert_close(param.grad, expected_grads[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_packed_rows_under_gradient_checkpointing(reentrant):
    reference, fast = prefix_pair("llama", projection=True)
    fast.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    ids, positions, labels, documents = packed_batch()
    _, expected_loss, expected_grads = alone_step(reference, ids, labels, documents)
    fast.train()
    out = fast(input_ids=ids, position_ids=positions, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, expected_loss, atol=2e-5, rtol=1e-5)
    for name, param in trainable(fast).items():
        torch.testing.assert_close(param.grad, expected_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_packed_rows_with_adapter_names_take_their_rows_adapter():
    reference, fast = two_adapter_pair()
    ids, positions, labels, documents = packed_batch()
    names = ["b", "default"]
    expected_logits, expected_loss, expected_grads = alone_step(reference, ids, labels, documents, names)
    fast.train()
    with EncoderCalls(fast, "default") as calls_a, EncoderCalls(fast, "b") as calls_b:
        out = fast(input_ids=ids, position_ids=positions, labels=labels, adapter_names=names)
    out.loss.backward()
    assert calls_a.sizes == [1] and calls_b.sizes == [1]
    torch.testing.assert_close(out.loss, expected_loss, atol=2e-5, rtol=1e-5)
    for (row, start, end), logits in zip(documents, expected_logits, strict=True):
        torch.testing.assert_close(out.logits[row, start:end], logits, atol=2e-5, rtol=1e-5)
    for name, param in trainable(fast).items():
        torch.testing.assert_close(param.grad, expected_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_packed_rows_with_a_length_dependent_rope_are_a_clear_error():
    """Phi-3's LongRoPE picks its factor by the forward's length: the padded batch of documents is longer
    than some documents alone, across its threshold here."""
    _, fast = prefix_pair("phi3")
    ids, positions, labels, _ = packed_batch()
    with pytest.raises(prefix_kv.PrefixTuningError, match="longrope rope scaling"):
        fast(input_ids=ids, position_ids=positions, labels=labels)


def test_packed_rows_hand_back_no_cache_and_are_refused_for_classification():
    _, fast = prefix_pair("llama")
    ids, positions, labels, _ = packed_batch()
    with torch.no_grad():
        out = fast(input_ids=ids, position_ids=positions)
    assert out.get("past_key_values") is None and out.get("cache") is None
    from fastprompt.testing.model_matrix import tiny_sequence_classifier

    classifier = fastprompt.get_peft_model(
        tiny_sequence_classifier("llama"), peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)
    )
    with pytest.raises(prefix_kv.PrefixTuningError, match="supported for CAUSAL_LM, not SEQ_CLS"):
        classifier(input_ids=ids, position_ids=positions)


# ------------------------------------------------------------------------------------ SEQ_CLS / TOKEN_CLS


def _classifier(task: str, model_type: str):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    from fastprompt.testing.causal_lms import tiny_config

    config = tiny_config(model_type)
    config.num_labels, config.pad_token_id = 3, PAD
    torch.manual_seed(0)
    auto = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForTokenClassification
    return auto.from_config(config).eval()


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen3"])
def test_classification_equals_the_definition(model_type, task):
    """SEQ_CLS and TOKEN_CLS on decoders. PEFT 0.21.2's SEQ_CLS prefix forward raises on transformers >= 5.24
    (its check looks for a ``past_key_values`` parameter, now ``cache``): the reference is its definition,
    the base model run on PEFT's own ``get_prompt`` cache with the prefixed mask."""
    from fastprompt.prompt_once.prompt_pass import cache_argument

    base = _classifier(task, model_type)
    torch.manual_seed(1)
    config = dict(task_type=task, num_virtual_tokens=5)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(**config))
    fast = fastprompt.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(**config))
    fast.load_state_dict(reference.state_dict())
    ids, mask, _ = batch()
    labels = torch.tensor([0, 1, 2]) if task == "SEQ_CLS" else (ids % 3).masked_fill(mask == 0, -100)
    prefixed = torch.cat((torch.ones(3, 5), mask), dim=1)
    reference_base = reference.get_base_model()
    cache = {cache_argument(reference_base): reference.get_prompt(3)}
    expected = reference_base(input_ids=ids, attention_mask=prefixed, labels=labels, **cache)
    expected.loss.backward()
    with EncoderCalls(fast) as calls:
        actual = fast(input_ids=ids, attention_mask=mask, labels=labels)
    actual.loss.backward()
    assert calls.sizes == [1]
    torch.testing.assert_close(actual.logits, expected.logits)
    torch.testing.assert_close(actual.loss, expected.loss)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert any("prompt_encoder" in name for name in grads)
    for name, param in fast.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_saved_files_are_pefts_and_load_both_ways(tmp_path):
    """PEFT's format both ways: fastprompt's model saves the bytes PEFT saves, and each loads the other's."""
    reference, fast = prefix_pair("llama")
    reference.save_pretrained(tmp_path / "peft")
    fast.save_pretrained(tmp_path / "fast")
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "fast" / file).read_bytes() == (tmp_path / "peft" / file).read_bytes()
    ids, mask, _ = batch()
    base = tiny_causal_lm("llama")
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fast")(
            input_ids=ids
        ).logits
        with _patched():
            loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
            actual = loaded(input_ids=ids).logits
    torch.testing.assert_close(actual, expected)


# ------------------------------------------------------------------------------------------- file checks


def _rewrite(directory, *, config=None, table=None):
    import json

    from safetensors.torch import load_file, save_file

    if config is not None:
        path = directory / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if table is not None:
        path = directory / "adapter_model.safetensors"
        tensors = load_file(path)
        tensors["prompt_embeddings"] = table(tensors["prompt_embeddings"]).contiguous()
        save_file(tensors, path)


def _nan(table):
    table = table.clone()
    table[0, 3] = float("nan")
    return table


BAD_FILES = {
    "nan": (dict(table=_nan), "adapter_model.safetensors: 'prompt_embeddings' holds 1 of"),
    "inf": (dict(table=lambda t: t.index_fill(0, torch.tensor([1]), float("inf"))), "not finite"),
    "width": (dict(table=lambda t: t[:, :-2]), r"prompt_embeddings' has shape \[10, 254\]"),
    "rows": (
        dict(table=lambda t: t[:-1]),
        r"has shape \[9, 256\], but the prefix adapter needs "
        r"\[num_virtual_tokens, num_layers \* 2 \* token_dim\] = \[10, 256\]",
    ),
    "num_layers": (dict(config={"num_layers": 3}), "adapter_config.json has num_layers=3, but the model"),
    "token_dim": (dict(config={"token_dim": 8}), "adapter_config.json has token_dim=8, but the model"),
    "not an int": (dict(config={"num_virtual_tokens": "10"}), "has num_virtual_tokens='10', expected"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_prefix_files_are_clear_errors_before_loading(tmp_path, case):
    """Wrong widths, a file for another model, NaN / Inf: an ``AdapterFileError`` naming the file and the
    field, raised before PEFT adds the adapter (``from_pretrained`` leaves the base model's flags as they
    were; ``load_adapter`` adds no adapter)."""
    from fastprompt.prompted_embeds.adapter_files import AdapterFileError

    reference, _ = prefix_pair("llama")
    reference.save_pretrained(tmp_path)
    changes, message = BAD_FILES[case]
    _rewrite(tmp_path, **changes)
    base = tiny_causal_lm("llama")
    with _patched():
        with pytest.raises(AdapterFileError, match=message) as error:
            peft.PeftModel.from_pretrained(base, tmp_path)
        assert str(tmp_path) in str(error.value)
        assert all(p.requires_grad for p in base.parameters())
        model = fastprompt.get_peft_model(tiny_causal_lm("llama"), prefix_config())
        with pytest.raises(AdapterFileError, match=message):
            model.load_adapter(tmp_path, adapter_name="loaded")
        assert "loaded" not in model.peft_config


def test_good_prefix_file_loads_under_the_checks(tmp_path):
    reference, _ = prefix_pair("gpt2", projection=True)
    reference.save_pretrained(tmp_path)
    with _patched():
        loaded = peft.PeftModel.from_pretrained(tiny_causal_lm("gpt2"), tmp_path)
    assert loaded.peft_config["default"].peft_type == "PREFIX_TUNING"


# ------------------------------------------------------------------------ encoder-decoder and encoder models

PEFTS_OWN = [
    ("t5", "SEQ_2_SEQ_LM"),
    ("bart", "SEQ_2_SEQ_LM"),
    ("bert", "SEQ_CLS"),
    ("roberta", "TOKEN_CLS"),
    ("bert", "QUESTION_ANS"),
    ("bert", "FEATURE_EXTRACTION"),
]


def _run_peft_call(family: str, task: str, patched: bool):
    """(outputs and gradients, or the exception) of a prefix-tuned train step through PEFT's API."""
    from fastprompt.testing import tiny_models

    base = tiny_models.build(family, task)
    if patched:
        fastprompt.patch_peft()
    try:
        torch.manual_seed(1)
        model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=4))
        model.train()
        ids = torch.randint(4, tiny_models.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
        call = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        if task == "SEQ_2_SEQ_LM":
            call["labels"] = ids[:, :4]
        elif task in ("SEQ_CLS", "TOKEN_CLS"):
            call["labels"] = torch.zeros(2, dtype=torch.long) if task == "SEQ_CLS" else ids % 2
        try:
            out = model(**call)
            first = out[0] if isinstance(out, tuple) else next(v for v in out.values() if torch.is_tensor(v))
            first.float().sum().backward()
        except Exception as error:  # noqa: BLE001 - PEFT's own error is the result compared
            return error
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return first.detach(), grads
    finally:
        fastprompt.unpatch_peft()


@pytest.mark.parametrize("family,task", PEFTS_OWN, ids=[f"{f}-{t}" for f, t in PEFTS_OWN])
def test_encoder_decoder_and_encoder_models_keep_pefts_path(family, task):
    """Under ``patch_peft()`` a prefix adapter on an encoder-decoder or encoder model runs PEFT's own prefix
    path unchanged: the same outputs and gradients, or the same error PEFT raises."""
    expected = _run_peft_call(family, task, patched=False)
    actual = _run_peft_call(family, task, patched=True)
    if isinstance(expected, Exception):
        assert type(actual) is type(expected) and str(actual) == str(expected)
        return
    assert not isinstance(actual, Exception), actual
    assert torch.equal(actual[0], expected[0])
    assert actual[1].keys() == expected[1].keys() and actual[1]
    for name in expected[1]:
        assert torch.equal(actual[1][name], expected[1][name]), name
