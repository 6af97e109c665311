"""P-tuning and multitask prompt-tuning adapters in PEFT's files: both ways, through ``AutoPeftModel``, and
bad files refused before PEFT touches the model.

PEFT stores P-tuning's encoder output (``prompt_embeddings``: a loaded adapter is ``inference_mode`` and
reads those rows as they are) and multitask's shared table with its task factors. fastprompt writes the
same files as PEFT, reads PEFT's, and under ``patch_peft`` ``AutoPeftModelForCausalLM.from_pretrained``
gives PEFT's outputs on the fused path. A damaged file (``fastprompt.testing.adapter_files``: truncated,
a missing or misshapen tensor, NaN / Inf values, a multitask file's task factors) is an
``AdapterFileError`` naming the adapter's directory, and the model is left as it was: no new adapter,
every prompt-module parameter (the encoder's MLP, the task factors) and ``requires_grad`` flag restored.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from peft_helpers import FastpromptOps, assert_model_unchanged, model_state
from safetensors.torch import load_file

from fastprompt.testing import tiny_models
from fastprompt.testing.adapter_files import BAD_FILES, TASK_FACTOR_BAD_FILES, corrupt_adapter

peft = pytest.importorskip("peft")
import fastprompt  # noqa: E402
from fastprompt.integrations import AdapterFileError  # noqa: E402

N = 4
METHODS = ["ptuning", "multitask"]


def method_config(method: str):
    if method == "ptuning":
        return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16)
    return peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, num_tasks=3, num_ranks=2
    )


def _extra(method: str, batch: int) -> dict:
    return {"task_ids": torch.arange(batch) % 3} if method == "multitask" else {}


def _trained(get_peft_model, method: str, base=None):
    """A model of ``method`` whose prompt module is "trained" (seeded, then shifted)."""
    base = tiny_models.build("llama", "CAUSAL_LM") if base is None else base
    torch.manual_seed(1)
    model = get_peft_model(base, method_config(method))
    with torch.no_grad():
        for param in model.prompt_encoder["default"].parameters():
            param.add_(0.25)
    return model.eval()


def _inputs(method: str) -> dict:
    inputs = tiny_models.batch(3, 6)
    return {**inputs, **_extra(method, 3)}


@pytest.mark.parametrize("method", METHODS)
def test_files_both_ways(tmp_path, method):
    """fastprompt saves PEFT's files (same tensors, same config); each loads the other's and gives the same
    logits as the model that saved it."""
    reference = _trained(peft.get_peft_model, method)
    fast = _trained(fastprompt.get_peft_model, method)
    fast.load_state_dict(reference.state_dict())
    inputs = _inputs(method)
    expected = reference(**inputs).logits
    reference.save_pretrained(tmp_path / "peft")
    fast.save_pretrained(tmp_path / "fast")
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("fast", "peft"))
    assert ours.keys() == theirs.keys() and "prompt_embeddings" in ours
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    for saved_by in ("peft", "fast"):
        loaded = fastprompt.accelerate(
            peft.PeftModel.from_pretrained(tiny_models.build("llama", "CAUSAL_LM"), tmp_path / saved_by)
        )
        assert loaded.peft_config["default"].inference_mode
        with FastpromptOps() as ops:
            got = loaded(**inputs, share_prompt_prefix=False).logits
        assert ops.forward == 1
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_auto_peft_model_under_patch_peft(tmp_path, method):
    """``AutoPeftModelForCausalLM.from_pretrained`` (the base model from the adapter's config, a local
    directory) under ``patch_peft``: the fused path, PEFT's logits, and generation."""
    base_dir = tmp_path / "base"
    tiny_models.build("llama", "CAUSAL_LM").save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    reference = _trained(peft.get_peft_model, method, base=AutoModelForCausalLM.from_pretrained(base_dir))
    reference.save_pretrained(tmp_path / "adapter")
    inputs = _inputs(method)
    expected = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()(**inputs).logits
    fastprompt.patch_peft()
    try:
        loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
        with FastpromptOps() as ops:
            got = loaded(**inputs, share_prompt_prefix=False).logits
        assert ops.forward == 1
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        ids = inputs["input_ids"][:2]
        extra = _extra(method, 2)
        tokens = loaded.generate(input_ids=ids, max_new_tokens=3, do_sample=False, **extra)
        assert tokens.shape == (2, ids.shape[1] + 3)
    finally:
        fastprompt.unpatch_peft()


def _bad_cases():
    cases = [(method, how) for method in METHODS for how in BAD_FILES]
    return cases + [("multitask", how) for how in TASK_FACTOR_BAD_FILES]


@pytest.mark.parametrize("method,how", _bad_cases())
def test_bad_file_is_refused_and_the_model_left_as_it_was(tmp_path, method, how):
    _trained(peft.get_peft_model, method).save_pretrained(tmp_path)
    corrupt_adapter(tmp_path, how)
    fast = _trained(fastprompt.get_peft_model, method).train()
    before = model_state(fast)
    with pytest.raises(AdapterFileError) as info:
        fast.load_adapter(tmp_path, adapter_name="new")
    assert str(tmp_path) in str(info.value)
    assert_model_unchanged(fast, before)
    with pytest.raises(AdapterFileError):  # into the existing adapter: its encoder / factors kept
        fast.load_adapter(tmp_path, adapter_name="default")
    assert_model_unchanged(fast, before)


@pytest.mark.parametrize("method,how", [("ptuning", "wrong_shape"), ("multitask", "task_rows_nan")])
def test_bad_file_from_pretrained_under_patch_peft(tmp_path, method, how):
    _trained(peft.get_peft_model, method).save_pretrained(tmp_path)
    corrupt_adapter(tmp_path, how)
    base = tiny_models.build("llama", "CAUSAL_LM")
    flags = {name: p.requires_grad for name, p in base.named_parameters()}
    fastprompt.patch_peft()
    try:
        with pytest.raises(AdapterFileError, match=os.path.basename(str(tmp_path))):
            peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        with pytest.raises(AdapterFileError):
            peft.PeftModel.from_pretrained(base, tmp_path)
    finally:
        fastprompt.unpatch_peft()
    assert {name: p.requires_grad for name, p in base.named_parameters()} == flags


def test_failed_load_into_an_existing_ptuning_adapter_restores_its_encoder(tmp_path, monkeypatch):
    """An error past the file checks (here: PEFT's weights loader) restores every encoder weight, not only
    the table."""
    _trained(peft.get_peft_model, "ptuning").save_pretrained(tmp_path)
    fast = _trained(fastprompt.get_peft_model, "ptuning").train()
    before = model_state(fast)

    def broken(model, state, adapter_name="default", **kwargs):
        with torch.no_grad():
            for param in model.prompt_encoder[adapter_name].parameters():
                param.zero_()
        raise RuntimeError("the loader broke half way")

    monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", broken)
    with pytest.raises(RuntimeError, match="half way"):
        fast.load_adapter(tmp_path, adapter_name="default")
    assert_model_unchanged(fast, before)
