"""Mixed precision and other wrappers set on a model's instance (issue 14).

``Accelerator(mixed_precision=...).prepare(model)`` (what ``Trainer(bf16=True)`` / ``fp16=True`` runs) sets
``model.forward`` to an autocast wrapper around the method; ``accelerate.hooks.add_hook_to_module`` and
users set their own. A fastprompt model calls whatever is set on the instance, exactly as a PEFT model
does, and still takes the fused path inside it. Reference: the same PEFT model prepared the same way.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import types
import warnings

import pytest
import torch
from peft_helpers import FastpromptOps, peft_config, reset_accelerator_state, train

import fastprompt
from fastprompt.testing import tiny_models

peft = pytest.importorskip("peft")
accelerate = pytest.importorskip("accelerate")
from fastprompt.integrations import WrappedBeforeFastpromptWarning  # noqa: E402
from fastprompt.prompt_once import kv_store as prompt_kv  # noqa: E402

ENTRY_POINTS = ["accelerate", "get_peft_model", "patch_peft"]


@pytest.fixture(autouse=True)
def _clean_state():
    """Each test starts and ends unpatched, with no accelerate state (mixed precision) left over."""
    reset_accelerator_state()
    yield
    fastprompt.unpatch_peft()
    reset_accelerator_state()


def _fast_model(entry: str, base, config):
    """A fastprompt prompt-tuning model built through entry point ``entry``."""
    if entry == "accelerate":
        return fastprompt.accelerate(peft.get_peft_model(base, config))
    if entry == "get_peft_model":
        return fastprompt.get_peft_model(base, config)
    fastprompt.patch_peft()
    return peft.get_peft_model(base, config)


def _pair(entry: str, family: str = "llama"):
    """(PEFT model, fastprompt model by ``entry``) with identical weights, in eval mode."""
    base = tiny_models.build(family, "CAUSAL_LM")
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(base), peft_config("CAUSAL_LM"))
    fast = _fast_model(entry, copy.deepcopy(base), peft_config("CAUSAL_LM"))
    fast.load_state_dict(reference.state_dict())
    return reference.eval(), fast.eval()


@contextlib.contextmanager
def _as_peft(model, reference):
    """While running ``reference`` (the plain PEFT model): ``patch_peft()`` lifted if in effect."""
    patched = model is reference and fastprompt.integrations.is_patched()
    if patched:
        fastprompt.unpatch_peft()
    try:
        yield
    finally:
        if patched:
            fastprompt.patch_peft()


def _autocast_probe(model) -> list[bool]:
    """Records ``torch.is_autocast_enabled("cpu")`` inside the base model (first decoder layer)."""
    seen: list[bool] = []
    layer = model.get_base_model().model.layers[0]
    layer.register_forward_pre_hook(lambda module, args: seen.append(torch.is_autocast_enabled("cpu")))
    return seen


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(mixed_precision="bf16", cpu=True)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_accelerator_bf16_autocast_reaches_the_base_model(entry):
    """Under the wrapper accelerate sets: autocast inside the base model, fp32 outputs, the fused op, and
    PEFT's logits and gradients."""
    reference, fast = _pair(entry)
    accelerator = _accelerator()
    inputs = tiny_models.batch()
    results = []
    for model in (reference, fast):
        seen = _autocast_probe(model)
        prepared = accelerator.prepare(model)
        assert prepared is model and "forward" in model.__dict__
        with _as_peft(model, reference), FastpromptOps() as ops:
            logits = prepared(**inputs).logits
            (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
        assert seen == [True]
        assert logits.dtype == torch.float32  # convert_outputs_to_fp32
        results.append((logits, model.prompt_encoder["default"].embedding.weight.grad, ops.forward))
    (ref_logits, ref_grad, ref_calls), (logits, grad, calls) = results
    assert ref_calls == 0 and calls == 1
    torch.testing.assert_close(logits, ref_logits, atol=0, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


def test_unwrap_model_and_disable_adapter_under_accelerate():
    """``disable_adapter()`` puts accelerate's wrapper back as PEFT does; ``unwrap_model`` removes it."""
    reference, fast = _pair("get_peft_model")
    accelerator = _accelerator()
    inputs = tiny_models.batch()
    for model in (reference, fast):
        accelerator.prepare(model)
        wrapper = model.__dict__["forward"]
        seen = _autocast_probe(model)
        with model.disable_adapter():
            assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]  # base model, no prompts
        assert model.__dict__["forward"] is wrapper
        with FastpromptOps() as ops:
            model(**inputs)
        assert seen == [False, True]
        assert ops.forward == (model is fast)
    unwrapped = accelerator.unwrap_model(fast, keep_fp32_wrapper=False)
    assert unwrapped is fast and "forward" not in fast.__dict__  # the class method, nothing stale left
    seen = _autocast_probe(fast)
    with FastpromptOps() as ops:
        assert fast(**inputs).logits.dtype == torch.float32
    assert ops.forward == 1 and seen == [False]


class _CountingHook(accelerate.hooks.ModelHook):
    def __init__(self):
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_hooks_and_users_wrappers_are_called(entry):
    """``add_hook_to_module`` on the top-level model (dispatch_model / device_map), on top of accelerate's
    autocast; a ``functools.wraps`` wrapper and a plain ``MethodType`` one: each is called, autocast stays
    active, the fused op is used."""
    _, model = _pair(entry)
    _accelerator().prepare(model)
    hook = _CountingHook()
    accelerate.hooks.add_hook_to_module(model, hook)
    seen = _autocast_probe(model)
    calls = []

    def wraps_forward(forward):
        @functools.wraps(forward)
        def wrapper(*args, **kwargs):
            calls.append("wraps")
            return forward(*args, **kwargs)

        return wrapper

    model.forward = wraps_forward(model.forward)
    inputs = tiny_models.batch()
    with FastpromptOps() as ops:
        model(**inputs)
    assert calls == ["wraps"] and hook.calls == 1 and seen == [True] and ops.forward == 1

    def plain(self, *args, _previous=model.forward, **kwargs):
        calls.append("plain")
        return _previous(*args, **kwargs)

    model.forward = types.MethodType(plain, model)
    with FastpromptOps() as ops:
        model(**inputs)
    assert calls == ["wraps", "plain", "wraps"] and hook.calls == 2 and seen == [True, True]
    assert ops.forward == 1
    accelerate.hooks.remove_hook_from_module(model)


def test_functools_wraps_bound_method_around_the_class_method_is_called():
    """A bound method of the instance whose function wraps fastprompt's wrapper (``functools.wraps`` copies
    its attributes) is not a stale copy of the class method: it is called."""
    _, model = _pair("get_peft_model")
    calls = []
    function = model.forward.__func__

    @functools.wraps(function)
    def spy(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return function(self, *args, **kwargs)

    model.forward = types.MethodType(spy, model)
    with FastpromptOps() as ops:
        model(**tiny_models.batch())
    assert calls == [(3, 6)] and ops.forward == 1
    model.forward = types.MethodType(function, model)  # the class method itself: nothing is stored
    assert "forward" not in model.__dict__


def test_wrapper_made_before_fastprompt_is_called_with_a_warning():
    """accelerate's wrapper around PEFT's own forward, set before the model was accelerated: it is called
    (autocast, PEFT's results) and one warning says the fused path is not taken."""
    reference, _ = _pair("get_peft_model")
    model = copy.deepcopy(reference)
    _accelerator().prepare(model)
    fastprompt.accelerate(model)
    seen = _autocast_probe(model)
    inputs = tiny_models.batch()
    with pytest.warns(WrappedBeforeFastpromptWarning, match="accelerator.prepare"):
        with FastpromptOps() as ops:
            logits = model(**inputs).logits
    assert seen == [True] and ops.forward == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**inputs)  # once per wrapper
    _accelerator().prepare(reference)
    torch.testing.assert_close(logits, reference(**inputs).logits, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------- generate


def test_generate_under_accelerate_with_adapter_names_and_reuse_prompt_kv():
    """``generate`` of a prepared model: PEFT's ``generate`` calls the base model's, not ``model.forward``,
    so accelerate's autocast is not active there, in PEFT as here. ``adapter_names`` rows equal each row
    alone; the prompt KV is computed and reused, equal to generation without reuse."""
    reference, model = _pair("get_peft_model")
    model.add_adapter("other", peft_config("CAUSAL_LM"))
    with torch.no_grad():
        model.prompt_encoder["other"].embedding.weight.normal_(generator=torch.Generator().manual_seed(5))
    model.eval()
    inputs = tiny_models.batch()
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=tiny_models.PAD)
    accelerator = _accelerator()
    accelerator.prepare(reference)
    seen_peft = _autocast_probe(reference)
    reference.generate(**inputs, **greedy)
    accelerator.prepare(model)
    seen = _autocast_probe(model)
    names = ["other", "default", "other"]
    prompt_kv.CALLS.clear()
    with FastpromptOps() as ops:
        mixed = model.generate(**inputs, adapter_names=names, reuse_prompt_kv=True, **greedy)
    assert seen_peft and not any(seen_peft) and seen and not any(seen)
    assert prompt_kv.CALLS == {"computed": 2} and ops.forward == 0  # the prompts come from the prompt KV
    assert torch.equal(mixed, model.generate(**inputs, adapter_names=names, reuse_prompt_kv=False, **greedy))
    for row, name in enumerate(names):
        model.set_adapter(name)
        alone = model.generate(**{k: v[row : row + 1] for k, v in inputs.items()}, **greedy)
        assert torch.equal(mixed[row : row + 1], alone), (row, name)
    model.set_adapter("default")
    with FastpromptOps() as ops:  # and the forward of the same model: autocast and the fused op
        model(**inputs)
    assert ops.forward == 1 and seen[-1] is True


def test_prompt_kv_is_not_reused_across_autocast_states():
    """A prompt KV computed under ``torch.autocast`` is not reused without it (and the reverse): generation
    with reuse equals generation without, in each state."""
    _, model = _pair("get_peft_model")
    inputs = tiny_models.batch()
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=tiny_models.PAD, output_scores=True,
                  return_dict_in_generate=True)  # fmt: skip
    prompt_kv.CALLS.clear()
    for autocast in (False, True, False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            reused = model.generate(**inputs, reuse_prompt_kv=True, **greedy)
            plain = model.generate(**inputs, reuse_prompt_kv=False, **greedy)
        assert torch.equal(reused.sequences, plain.sequences)
        torch.testing.assert_close(reused.scores, plain.scores, atol=2e-2 if autocast else 1e-5, rtol=0)
    assert prompt_kv.CALLS == {"computed": 4}


# ---------------------------------------------------------------------------------------- Trainer


@pytest.mark.parametrize("entry", ["get_peft_model", "patch_peft"])
def test_trainer_bf16_trains_like_peft(entry, tmp_path):
    """``Trainer(bf16=True, use_cpu=True)``: autocast inside the base model at every step, the fused op
    forward and backward, and after 4 steps (lr 0.1) PEFT's prompt table and losses."""
    reference, fast = _pair(entry)
    before = fast.prompt_encoder["default"].embedding.weight.detach().clone()
    seen_peft, seen = _autocast_probe(reference), _autocast_probe(fast)
    with _as_peft(reference, reference):
        losses_peft = train(reference, tmp_path / "peft", max_steps=4, bf16=True)
    with FastpromptOps() as ops:
        losses = train(fast, tmp_path / "fast", max_steps=4, bf16=True)
    assert seen_peft == [True] * 4 and seen == [True] * 4
    assert ops.forward == 4 and any(name.startswith("prompt_concat_prompt_grad") for name in ops.names)
    weight = fast.prompt_encoder["default"].embedding.weight
    assert not torch.equal(weight, before)
    torch.testing.assert_close(weight, reference.prompt_encoder["default"].embedding.weight, atol=0, rtol=0)
    assert losses == losses_peft


def test_trainer_bf16_with_the_shared_prompt_prefix(tmp_path):
    """``Trainer(bf16=True)`` on a model accelerated with ``share_prompt_prefix=True``: the prompt runs once
    per batch (the first decoder layer never sees N+L positions) under autocast, and after 4 steps the
    losses and the prompt table are PEFT's under bf16, up to bf16 rounding (the shared pass rounds in
    another order, as much as PEFT's bf16 run differs from its fp32 run: about 3e-3 here)."""
    from fastprompt.prompt_once import policy as shared_prefix

    reference, fast = _pair("get_peft_model")
    fastprompt.accelerate(fast, share_prompt_prefix=True)
    seen_peft, seen = _autocast_probe(reference), _autocast_probe(fast)
    lengths = []
    fast.get_base_model().model.layers[0].register_forward_pre_hook(
        lambda module, args: lengths.append(args[0].shape[1])
    )
    losses_peft = train(reference, tmp_path / "peft", max_steps=4, bf16=True)
    before = shared_prefix.CALLS["shared"]
    losses = train(fast, tmp_path / "fast", max_steps=4, bf16=True)
    assert shared_prefix.CALLS["shared"] - before == 4
    assert seen_peft == [True] * 4 and seen == [True] * 8  # the prompt pass and the rows' pass, each step
    n = fast.peft_config["default"].num_virtual_tokens
    assert lengths[0::2] == [n] * 4 and n not in lengths[1::2]  # the prompt alone, then the rows alone
    torch.testing.assert_close(losses, losses_peft, atol=0, rtol=2e-3)
    table = fast.prompt_encoder["default"].embedding.weight.detach()
    difference = (table - reference.prompt_encoder["default"].embedding.weight.detach()).abs()
    # README: "after a few AdamW steps a few table entries can differ by up to 2x the learning rate" (Adam
    # normalizes: an entry whose bf16 gradient rounds to another sign steps the other way). The rest 1e-2.
    assert difference.max() <= 2 * 0.1 + 1e-6
    assert (difference > 1e-2).sum() <= max(1, difference.numel() // 10)
