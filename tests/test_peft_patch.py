"""patch_peft / unpatch_peft / accelerate: what gets covered, what is left alone, what is restored."""

from __future__ import annotations

import copy
import gc
import json
import os
import pathlib
import pickle
import subprocess
import sys
import warnings

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
    """LoRA and prefix tuning stay PEFT's; P-tuning (rows prepended, from its encoder) takes the fused
    path with PEFT's result (tests/test_ptuning.py checks it in depth)."""
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
    ).eval()
    with FastpromptOps() as ops:
        outs = [
            lora(**inputs).logits,
            prefix(**inputs).logits,
            lora.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0),
        ]
    assert ops.names == []
    with FastpromptOps() as ops:
        p_tuning_logits = p_tuning(**inputs).logits
    assert ops.forward == 1
    fastprompt.unpatch_peft()
    try:
        assert torch.equal(outs[0], lora(**inputs).logits)
        assert torch.equal(outs[1], prefix(**inputs).logits)
        torch.testing.assert_close(p_tuning_logits, p_tuning(**inputs).logits, rtol=1e-5, atol=1e-6)
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


# ------------------------------------------------------------ light, warning-free, survives a new process

TESTS_DIR = pathlib.Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent


def _run_python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT)])}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=TESTS_DIR
    )


def test_patch_and_unpatch_raise_no_warning_and_do_not_walk_the_heap(monkeypatch):
    """No warning at all (``filterwarnings = error`` suites), and no ``gc.get_objects()`` heap walk."""

    def no_heap_walk(*args, **kwargs):
        raise AssertionError("patch_peft / unpatch_peft walked the heap")

    model = peft.get_peft_model(tiny_models.build("gpt2", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
    monkeypatch.setattr(gc, "get_objects", no_heap_walk)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            fastprompt.patch_peft()
            fastprompt.unpatch_peft()
    assert not fastprompt.integrations.is_patched()
    with FastpromptOps() as ops:
        model(**tiny_models.batch())
    assert ops.names == []


def test_patch_and_unpatch_under_python_w_error():
    result = _run_python(
        "-W",
        "error",
        "-c",
        "import fastprompt; fastprompt.patch_peft(); fastprompt.unpatch_peft(); fastprompt.patch_peft(); "
        "print('ok', fastprompt.integrations.is_patched())",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "True"]


def test_disable_adapter_while_patched_leaves_nothing_on_the_instance(patched):
    """Inside disable_adapter() the base model runs; after it, the instance dict is as before."""
    model = peft.get_peft_model(tiny_models.build("gpt2", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
    inputs = tiny_models.batch()
    before = set(model.__dict__)
    with model.disable_adapter():
        with FastpromptOps() as ops:
            disabled = model(**inputs).logits
        assert ops.names == []
        assert disabled.shape[1] == inputs["input_ids"].shape[1]  # no virtual tokens
        assert torch.equal(disabled, model.base_model(**inputs).logits)
    assert set(model.__dict__) == before
    with FastpromptOps() as ops:
        assert model(**inputs).logits.shape[1] == 3 + inputs["input_ids"].shape[1]
    assert ops.forward == 1


def test_user_assigned_forward_is_respected(patched):
    """Only stale copies of PEFT's own method are passed over, not something a user (or a hook) set."""
    model = peft.get_peft_model(tiny_models.build("gpt2", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape)
        return original(*args, **kwargs)

    original = model.forward
    model.forward = spy
    with FastpromptOps() as ops:
        model(**tiny_models.batch())
    assert seen == [(3, 6)] and ops.forward == 1
    del model.forward
    assert "forward" not in model.__dict__
    with pytest.raises(AttributeError):
        del model.forward


def test_saving_and_restoring_a_class_method_is_exact(patched):
    """``original = cls.forward; cls.forward = spy; ...; cls.forward = original`` (a common way to spy on
    a method) puts back exactly what was there, on PEFT's patched classes and on accelerated ones."""
    accelerated = fastprompt.accelerate(
        peft.get_peft_model(tiny_models.build("gpt2", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
    )
    for cls in (peft.PeftModelForCausalLM, type(accelerated)):
        for attribute in ("forward", "prepare_inputs_for_generation"):
            before = cls.__dict__[attribute]
            original = getattr(cls, attribute)
            setattr(cls, attribute, lambda self, *args, _f=original, **kwargs: _f(self, *args, **kwargs))
            setattr(cls, attribute, original)
            assert cls.__dict__[attribute] is before
    model = peft.get_peft_model(tiny_models.build("gpt2", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
    fastprompt.unpatch_peft()
    with model.disable_adapter():  # leaves PEFT's own forward on the instance
        pass
    fastprompt.patch_peft()
    with FastpromptOps() as ops:
        peft.PeftModelForCausalLM.forward(model, **tiny_models.batch())  # called on the class
        model(**tiny_models.batch())
    assert ops.forward == 2


_PICKLE_SCRIPT = """
import json, pickle, sys
import torch
from peft_helpers import FastpromptOps

directory = sys.argv[1]
data = torch.load(f"{directory}/inputs.pt")
results = {}
with open(f"{directory}/model.pkl", "rb") as file:
    loaded = {"pickle": pickle.load(file)}
loaded["torch.load"] = torch.load(f"{directory}/model.pt", weights_only=False)
for route, model in loaded.items():
    with FastpromptOps() as ops:
        logits = model(**data["inputs"]).logits
        sequences = model.generate(**data["inputs"], max_new_tokens=3, do_sample=False, pad_token_id=0)
    results[route] = {
        "class": type(model).__name__,
        "fused_calls": ops.forward,
        "same_logits": bool(torch.equal(logits, data["logits"])),
        "same_sequences": bool(torch.equal(sequences, data["sequences"])),
    }
print(json.dumps(results))
"""


def test_accelerated_model_unpickles_in_a_fresh_process(tmp_path):
    model = fastprompt.get_peft_model(tiny_models.build("llama", "CAUSAL_LM"), peft_config("CAUSAL_LM"))
    with torch.no_grad():  # a table that differs from any fresh initialization
        model.prompt_encoder["default"].embedding.weight.normal_(generator=torch.Generator().manual_seed(3))
    with model.disable_adapter():
        pass
    inputs = tiny_models.batch()
    with FastpromptOps() as ops:
        logits = model(**inputs).logits
        sequences = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert ops.forward == 2
    torch.save({"inputs": inputs, "logits": logits, "sequences": sequences}, tmp_path / "inputs.pt")
    with open(tmp_path / "model.pkl", "wb") as file:
        pickle.dump(model, file)
    torch.save(model, tmp_path / "model.pt")

    result = _run_python("-c", _PICKLE_SCRIPT, str(tmp_path))
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for route in ("pickle", "torch.load"):
        assert results[route] == {
            "class": "FastPeftModelForCausalLM",
            "fused_calls": 2,  # forward, and the prefill of generate
            "same_logits": True,
            "same_sequences": True,
        }, route


class UserSubclass(peft.PeftModelForSequenceClassification):
    """A user's subclass of a PEFT class (importable: pickle needs that)."""


def test_copies_of_accelerated_models_stay_accelerated(tmp_path):
    """deepcopy, pickle and torch.save in this process; also a user subclass of a PEFT class."""
    base = tiny_models.build("bert", "SEQ_CLS")
    for model in (
        fastprompt.get_peft_model(copy.deepcopy(base), peft_config("SEQ_CLS")),
        fastprompt.accelerate(UserSubclass(copy.deepcopy(base), peft_config("SEQ_CLS"))),
    ):
        inputs = tiny_models.batch()
        expected = model(**inputs).logits
        torch.save(model, tmp_path / "model.pt")
        clones = [
            copy.deepcopy(model),
            pickle.loads(pickle.dumps(model)),
            torch.load(tmp_path / "model.pt", weights_only=False),
        ]
        for clone in clones:
            assert type(clone) is type(model) and isinstance(clone, type(model)._fastprompt_base)
            with FastpromptOps() as ops:
                assert torch.equal(clone(**inputs).logits, expected)
            assert ops.forward == 1


def test_fast_classes_are_importable_by_name():
    """Pickles that name the class itself (as fastprompt 0.1's did) load in any process."""
    from fastprompt.integrations import peft_patch

    cls = peft_patch.FastPeftModelForSeq2SeqLM
    assert issubclass(cls, peft.PeftModelForSeq2SeqLM) and cls._fastprompt_base is peft.PeftModelForSeq2SeqLM
    assert pickle.loads(pickle.dumps(cls)) is cls
    with pytest.raises(AttributeError):
        peft_patch.FastNotAPeftClass  # noqa: B018
