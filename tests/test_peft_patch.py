"""patch_peft / unpatch_peft / accelerate: what gets covered, what is left alone, what is restored."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from peft_helpers import FastpromptOps, peft_config

import fastprompt
from fastprompt.testing import tiny_models

peft = pytest.importorskip("peft")
import peft.peft_model as peft_model_module  # noqa: E402
from peft import get_peft_model as get_peft_model_imported_early  # noqa: E402

CLASSES = [
    peft_model_module.PeftModel,
    peft.PeftModelForCausalLM,
    peft.PeftModelForSeq2SeqLM,
    peft.PeftModelForSequenceClassification,
    peft.PeftModelForTokenClassification,
    peft.PeftModelForQuestionAnswering,
    peft.PeftModelForFeatureExtraction,
]


@pytest.fixture
def patched():
    fastprompt.patch_peft()
    yield
    fastprompt.unpatch_peft()


def _class_dicts():
    return [dict(cls.__dict__) for cls in CLASSES]


def test_unpatch_restores_exactly():
    before = _class_dicts()
    fastprompt.patch_peft()
    fastprompt.patch_peft()  # idempotent
    assert fastprompt.integrations.is_patched()
    changed = [cls for cls, old in zip(CLASSES, before, strict=True) if dict(cls.__dict__) != old]
    assert set(changed) == set(CLASSES)
    fastprompt.unpatch_peft()
    fastprompt.unpatch_peft()
    after = _class_dicts()
    for old, new in zip(before, after, strict=True):
        assert old.keys() == new.keys()
        for key in old:
            assert new[key] is old[key], key


def test_functions_imported_before_patching_are_covered(patched):
    model = get_peft_model_imported_early(tiny_models.build("gpt2", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
    assert type(model) is peft.PeftModelForCausalLM  # PEFT's own class, patched
    inputs = tiny_models.batch()
    with FastpromptOps() as ops:
        model(**inputs)
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert ops.forward == 2


def test_loading_routes_are_covered(tmp_path, patched):
    from transformers import AutoModelForCausalLM

    tiny_models.build("llama", "CAUSAL_LM").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()  # name_or_path: the local folder
    model = peft.get_peft_model(copy.deepcopy(base), peft_config("CAUSAL_LM"))
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    inputs = tiny_models.batch()

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    by_task = peft.PeftModelForCausalLM.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    for candidate in (loaded, auto, by_task):
        with FastpromptOps() as ops:
            logits = candidate(**inputs).logits
        assert ops.forward == 1
        assert torch.equal(logits, model(**inputs).logits)


def test_other_adapter_types_untouched(patched):
    inputs = tiny_models.batch()
    lora = peft.get_peft_model(
        tiny_models.build("llama", "CAUSAL_LM"),
        peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False),
    )
    prefix = peft.get_peft_model(
        tiny_models.build("llama", "CAUSAL_LM"),
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    )
    p_tuning = peft.get_peft_model(
        tiny_models.build("bert", "SEQ_CLS"),
        peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=2, encoder_hidden_size=8),
    )
    with FastpromptOps() as ops:
        outs = [
            lora(**inputs).logits,
            prefix(**inputs).logits,
            p_tuning(**inputs).logits,
            lora.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0),
        ]
    assert ops.names == []
    fastprompt.unpatch_peft()
    try:
        assert torch.equal(outs[0], lora(**inputs).logits)
        assert torch.equal(outs[1], prefix(**inputs).logits)
    finally:
        fastprompt.patch_peft()


def test_after_unpatch_models_use_peft_again():
    fastprompt.patch_peft()
    fastprompt.unpatch_peft()
    model = peft.get_peft_model(tiny_models.build("gpt2", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
    with FastpromptOps() as ops:
        model(**tiny_models.batch())
    assert ops.names == []


def test_accelerate_in_place_idempotent_and_picklable():
    model = peft.get_peft_model(tiny_models.build("roberta", "TOKEN_CLS"), peft_config("TOKEN_CLS"))
    same = fastprompt.accelerate(model)
    assert same is model and isinstance(model, peft.PeftModelForTokenClassification)
    cls = type(model)
    assert fastprompt.accelerate(model) is model and type(model) is cls
    inputs = tiny_models.batch()
    expected = model(**inputs).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone) is cls
        with FastpromptOps() as ops:
            assert torch.equal(clone(**inputs).logits, expected)
        assert ops.forward == 1
    with pytest.raises(TypeError, match="peft.PeftModel"):
        fastprompt.accelerate(torch.nn.Linear(2, 2))


def test_accelerate_after_disable_adapter():
    """PEFT's disable_adapter() leaves bound methods in the instance: accelerate still takes effect."""
    model = peft.get_peft_model(tiny_models.build("gpt2", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
    with model.disable_adapter():
        pass
    fastprompt.accelerate(model)
    with FastpromptOps() as ops:
        model(**tiny_models.batch())
    assert ops.forward == 1


def test_patch_covers_existing_models_after_disable_adapter():
    """A model built, and taken through disable_adapter(), before patch_peft() is covered too; after
    unpatch_peft() it uses PEFT again, even if disable_adapter() ran while patched."""
    model = peft.get_peft_model(tiny_models.build("gpt2", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
    with model.disable_adapter():
        pass
    inputs = tiny_models.batch()
    expected = model(**inputs).logits
    fastprompt.patch_peft()
    try:
        with FastpromptOps() as ops:
            assert torch.equal(model(**inputs).logits, expected)
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert ops.forward == 2
        with model.disable_adapter():
            pass
    finally:
        fastprompt.unpatch_peft()
    with FastpromptOps() as ops:
        assert torch.equal(model(**inputs).logits, expected)
    assert ops.names == []


def test_accelerated_models_survive_unpatch():
    model = fastprompt.get_peft_model(tiny_models.build("gpt2", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
    fastprompt.patch_peft()
    fastprompt.unpatch_peft()
    with FastpromptOps() as ops:
        model(**tiny_models.batch())
    assert ops.forward == 1


def test_peft_model_methods_still_work(patched):
    model = peft.get_peft_model(tiny_models.build("gpt2", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
    assert model.get_prompt(batch_size=2).shape == (2, 3, tiny_models.HIDDEN)
    assert model.get_prompt_embedding_to_save("default").shape == (3, tiny_models.HIDDEN)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 3 * tiny_models.HIDDEN and total > trainable
    assert model.base_model is model.get_base_model()
    import inspect

    assert "input_ids" in inspect.signature(model.forward).parameters
