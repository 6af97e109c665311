"""Adapters and files: PEFT -> fastprompt -> PEFT round trips, several adapters, bad files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft_helpers import (
    FastpromptOps,
    assert_model_unchanged,
    main_output,
    model_pair,
    model_state,
    peft_config,
)
from safetensors import safe_open
from safetensors.torch import load_file

import fastprompt
from fastprompt.integrations import AdapterFileError
from fastprompt.testing import tiny_models
from fastprompt.testing.adapter_files import BAD_FILES, corrupt_adapter

peft = pytest.importorskip("peft")


def _files(directory) -> tuple[dict, dict, dict]:
    """(tensors, safetensors metadata, adapter_config.json) of a saved adapter."""
    path = os.path.join(directory, "adapter_model.safetensors")
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata()
    with open(os.path.join(directory, "adapter_config.json")) as file:
        config = json.load(file)
    return load_file(path), metadata, config


@pytest.mark.parametrize("family,task", [("gpt2", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("bert", "SEQ_CLS")])
def test_round_trip_peft_fastprompt_peft(tmp_path, family, task):
    reference, _ = model_pair(family, task)
    with torch.no_grad():  # a "trained" prompt
        reference.prompt_encoder["default"].embedding.weight.add_(0.5)
    reference.save_pretrained(tmp_path / "peft")
    inputs = tiny_models.batch(token_type_ids=family == "bert")
    if task == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = torch.randint(4, 100, (3, 4))
    expected = main_output(reference(**inputs))

    loaded = fastprompt.accelerate(
        peft.PeftModel.from_pretrained(tiny_models.build(family, task), tmp_path / "peft")
    )
    assert isinstance(loaded, peft.PeftModel) and loaded.peft_config["default"].inference_mode
    assert not loaded.training
    with FastpromptOps() as ops:
        assert torch.equal(main_output(loaded(**inputs)), expected)
    assert ops.forward == 1

    loaded.save_pretrained(tmp_path / "fast")
    tensors_peft, meta_peft, config_peft = _files(tmp_path / "peft")
    tensors_fast, meta_fast, config_fast = _files(tmp_path / "fast")
    assert "prompt_embeddings" in tensors_fast and tensors_fast.keys() == tensors_peft.keys()
    rows = 6 if task == "SEQ_2_SEQ_LM" else 3
    assert tensors_fast["prompt_embeddings"].shape == (rows, tiny_models.HIDDEN)
    assert tensors_fast["prompt_embeddings"].dtype == torch.float32
    for key in tensors_peft:
        assert torch.equal(tensors_fast[key], tensors_peft[key]), key
    assert meta_fast == meta_peft == {"format": "pt"}
    # what PEFT itself writes after the same load (PEFT appends SEQ_CLS's modules_to_save again on each
    # load, a PEFT quirk), and that the prompt-tuning fields are those of the original files
    peft.PeftModel.from_pretrained(tiny_models.build(family, task), tmp_path / "peft").save_pretrained(
        tmp_path / "peft2"
    )
    assert config_fast == _files(tmp_path / "peft2")[2] and config_fast["inference_mode"] is True
    config_fast.pop("modules_to_save"), config_peft.pop("modules_to_save")
    assert config_fast == config_peft

    back = peft.PeftModel.from_pretrained(tiny_models.build(family, task), tmp_path / "fast")
    assert type(back).__module__ == "peft.peft_model"
    assert torch.equal(main_output(back(**inputs)), expected)


def test_trained_fastprompt_adapter_loads_in_peft(tmp_path):
    _, fast = model_pair("llama", "CAUSAL_LM")
    fast.train()
    optimizer = torch.optim.SGD(fast.parameters(), lr=1.0)
    inputs = tiny_models.batch()
    fast(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    fast.eval()
    fast.save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(tiny_models.build("llama", "CAUSAL_LM"), tmp_path)
    assert torch.equal(
        back.prompt_encoder["default"].embedding.weight, fast.prompt_encoder["default"].embedding.weight
    )
    assert torch.equal(back(**inputs).logits, fast(**inputs).logits)


def test_several_adapters(tmp_path):
    reference, fast = model_pair("opt", "CAUSAL_LM")
    for model in (reference, fast):
        torch.manual_seed(5)
        model.add_adapter("other", peft_config("CAUSAL_LM", num_virtual_tokens=5))
    inputs = tiny_models.batch()
    for name, length in (("other", 5), ("default", 3)):
        reference.set_adapter(name)
        fast.set_adapter(name)
        with FastpromptOps() as ops:
            logits = fast(**inputs).logits
        assert ops.forward == 1 and logits.shape[1] == length + 6
        assert torch.equal(logits, reference(**inputs).logits)
        assert torch.equal(
            fast.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0),
            reference.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False),
        )

    fast.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "other" / "adapter_model.safetensors")
    loaded = fastprompt.accelerate(
        peft.PeftModel.from_pretrained(tiny_models.build("opt", "CAUSAL_LM"), tmp_path)
    )
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    loaded.set_adapter("other")
    reference.set_adapter("other")
    assert torch.equal(loaded(**inputs).logits, reference(**inputs).logits)

    fast.set_adapter("other")
    with pytest.warns(UserWarning, match="Setting active adapter to default"):
        fast.delete_adapter("other")
    assert fast.active_adapter == "default" and "other" not in fast.prompt_encoder
    reference.set_adapter("default")
    assert torch.equal(fast(**inputs).logits, reference(**inputs).logits)


# ------------------------------------------------------------------------------------------ bad files


def _saved_adapter(tmp_path, family="gpt2", task="CAUSAL_LM"):
    reference, _ = model_pair(family, task)
    reference.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("how", BAD_FILES)
def test_load_adapter_bad_file_leaves_model_as_it_was(tmp_path, how):
    directory = _saved_adapter(tmp_path)
    corrupt_adapter(directory, how)
    _, fast = model_pair("gpt2", "CAUSAL_LM")
    before = model_state(fast)
    with pytest.raises(AdapterFileError) as info:
        fast.load_adapter(directory, adapter_name="new")
    assert str(directory) in str(info.value)
    assert_model_unchanged(fast, before)
    # and into an existing adapter
    with pytest.raises(AdapterFileError):
        fast.load_adapter(directory, adapter_name="default")
    assert_model_unchanged(fast, before)


@pytest.mark.parametrize("how", ["truncated", "missing_key", "wrong_shape"])
def test_from_pretrained_bad_file_under_patch(tmp_path, how):
    directory = _saved_adapter(tmp_path)
    corrupt_adapter(directory, how)
    base = tiny_models.build("gpt2", "CAUSAL_LM")
    flags = {name: p.requires_grad for name, p in base.named_parameters()}
    fastprompt.patch_peft()
    try:
        with pytest.raises(AdapterFileError):
            peft.PeftModel.from_pretrained(base, directory)
    finally:
        fastprompt.unpatch_peft()
    assert {name: p.requires_grad for name, p in base.named_parameters()} == flags


@pytest.mark.parametrize("how", ["nan", "inf", "nan_bin"])
def test_non_finite_table_is_refused_with_file_and_count(tmp_path, how):
    """PEFT loads a table holding NaN / Inf silently (every output is then NaN); fastprompt refuses it,
    naming the file and how many values are not finite, and the prompt table stays as it was."""
    directory = _saved_adapter(tmp_path)
    corrupt_adapter(directory, how)
    reference, fast = model_pair("gpt2", "CAUSAL_LM")
    reference.load_adapter(directory, adapter_name="new")  # PEFT: no complaint
    assert not torch.isfinite(reference.prompt_encoder["new"].embedding.weight).all()
    table = fast.prompt_encoder["default"].embedding.weight.detach().clone()
    with pytest.raises(AdapterFileError, match=r"holds 2 of \d+ values that are not finite") as info:
        fast.load_adapter(directory, adapter_name="default")
    name = "adapter_model.bin" if how == "nan_bin" else "adapter_model.safetensors"
    assert os.path.join(str(directory), name) in str(info.value)
    assert torch.equal(fast.prompt_encoder["default"].embedding.weight, table)


def test_adapter_file_error_is_exported():
    assert fastprompt.AdapterFileError is AdapterFileError and "AdapterFileError" in fastprompt.__all__


def test_error_types_stay_compatible():
    error = AdapterFileError("x")
    assert isinstance(error, ValueError) and isinstance(error, KeyError) and isinstance(error, RuntimeError)
    assert str(error) == "x"


def test_failure_after_the_adapter_was_added_is_rolled_back(tmp_path, monkeypatch):
    """Errors past the file checks (here: the weights loader itself) still leave the model as it was."""
    directory = _saved_adapter(tmp_path, "bert", "SEQ_CLS")
    _, fast = model_pair("bert", "SEQ_CLS")
    before = model_state(fast)

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(peft.peft_model, "load_peft_weights", broken)
    with pytest.raises(OSError, match="disk on fire"):
        fast.load_adapter(directory, adapter_name="new")
    assert_model_unchanged(fast, before)
    assert not any("new" in name for name, _ in fast.named_modules())
