"""The PEFT version check: PEFT 0.21.x takes the fused path; any other version gets one warning and
PEFT's own code (or the fused path with FASTPROMPT_ALLOW_UNTESTED_PEFT=1). The version reader is
monkeypatched; the installed PEFT is the tested one."""

from __future__ import annotations

import warnings

import pytest
import tiny_models
import torch
from peft_helpers import FastpromptOps, peft_config

import fastprompt
from fastprompt.integrations import UntestedPeftWarning, peft_version

peft = pytest.importorskip("peft")


@pytest.fixture
def version(monkeypatch):
    """Set the version the reader returns; the decision is made afresh (and restored afterwards)."""
    monkeypatch.delenv(peft_version.ALLOW_ENV, raising=False)
    monkeypatch.setitem(peft_version._cache, "allowed", None)

    def set_version(value: str) -> None:
        monkeypatch.setattr(peft_version, "installed_peft_version", lambda: value)
        peft_version._cache["allowed"] = None

    return set_version


def _no_warning(function, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return function(*args)


def test_the_installed_peft_is_the_tested_one():
    assert peft_version._release(peft.__version__)[:2] == peft_version.TESTED
    assert peft_version.installed_peft_version() == peft.__version__


@pytest.mark.parametrize("value", ["0.21.0", "0.21.2", "0.21.9", "0.21.3.dev0"])
def test_tested_versions_take_the_fused_path_silently(version, value):
    version(value)
    assert _no_warning(peft_version.fused_path_allowed) is True


@pytest.mark.parametrize("value", ["0.13.0", "0.20.1", "0.22.0", "0.22.0.dev0", "1.0.0", "not a version"])
def test_other_versions_warn_once_and_leave_models_to_peft(version, value):
    version(value)
    model = peft.get_peft_model(tiny_models.build("gpt2", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
    before = {cls: dict(cls.__dict__) for cls in (peft.PeftModel, peft.PeftModelForCausalLM)}
    with pytest.warns(UntestedPeftWarning, match=rf"peft 0\.21\.x only; peft {value} is installed") as record:
        assert fastprompt.accelerate(model) is model
    assert len(record) == 1 and "FASTPROMPT_ALLOW_UNTESTED_PEFT=1" in str(record[0].message)
    assert type(model) is peft.PeftModelForCausalLM
    _no_warning(fastprompt.patch_peft)  # once per process: no second warning; and nothing is patched
    try:
        assert not fastprompt.integrations.is_patched()
        assert {cls: dict(cls.__dict__) for cls in before} == before
        other = fastprompt.get_peft_model(tiny_models.build("gpt2", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
        assert type(other) is peft.PeftModelForCausalLM
        inputs = tiny_models.batch()
        with FastpromptOps() as ops:
            model(**inputs)
            other(**inputs)
        assert ops.names == []
    finally:
        fastprompt.unpatch_peft()


def test_models_accelerated_earlier_run_peft_code_with_an_untested_version(version):
    """E.g. a model unpickled into a process with another PEFT: same results as PEFT, no fused op."""
    model = fastprompt.get_peft_model(tiny_models.build("llama", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
    inputs = tiny_models.batch()
    with FastpromptOps() as ops:
        fused = model(**inputs).logits
    assert ops.forward == 1
    version("0.22.0")
    with pytest.warns(UntestedPeftWarning, match="PEFT's own code"):
        with FastpromptOps() as ops:
            unfused = model(**inputs).logits
    assert ops.names == []
    torch.testing.assert_close(unfused, fused, atol=1e-6, rtol=1e-6)


def test_the_fused_path_can_be_forced_with_an_untested_version(version, monkeypatch):
    version("0.22.0")
    monkeypatch.setenv(peft_version.ALLOW_ENV, "1")
    model = peft.get_peft_model(tiny_models.build("gpt2", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
    with pytest.warns(UntestedPeftWarning, match="fused path anyway"):
        fastprompt.accelerate(model)
    assert isinstance(model, fastprompt.integrations.peft_methods.FastPromptModel)
    with FastpromptOps() as ops:
        _no_warning(model, tiny_models.batch()["input_ids"])
    assert ops.forward == 1
