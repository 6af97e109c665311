"""fastprompt.PromptTuningConfig / PromptTuningInit against PEFT 0.21's."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from fastprompt import PromptTuningConfig, PromptTuningInit
from fastprompt.prompted_embeds.config import from_peft_config, to_peft_config

peft = pytest.importorskip("peft")


def test_same_fields_order_and_defaults():
    ours = {f.name: f for f in dataclasses.fields(PromptTuningConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.PromptTuningConfig)}
    assert list(ours) == list(theirs)
    mine, ref = PromptTuningConfig(), peft.PromptTuningConfig()
    for name in ours:
        assert getattr(mine, name) == getattr(ref, name), name


def test_enum_values_and_cross_equality():
    assert [m.value for m in PromptTuningInit] == [m.value for m in peft.PromptTuningInit]
    for ours in PromptTuningInit:
        assert ours == peft.PromptTuningInit(ours.value) == ours.value


def _error(cls, **kwargs):
    try:
        cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 - comparing whatever is raised
        return type(exc), str(exc)
    return None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prompt_tuning_init="TEXT"),
        dict(prompt_tuning_init="TEXT", tokenizer_name_or_path=""),
        dict(prompt_tuning_init="TEXT", tokenizer_name_or_path="tok"),
        dict(prompt_tuning_init="TEXT", tokenizer_name_or_path="tok", prompt_tuning_init_text=""),
        dict(prompt_tuning_init=PromptTuningInit.RANDOM, tokenizer_kwargs={"foo": "bar"}),
        dict(prompt_tuning_init="SAMPLE_VOCAB", tokenizer_kwargs={"a": 1}),
        dict(prompt_tuning_init="RANDOM", tokenizer_kwargs={}),
        dict(task_type="NOT_A_TASK"),
        dict(task_type="CAUSAL_LM", num_virtual_tokens=4),
    ],
)
def test_post_init_validation_same_as_peft(kwargs):
    theirs = _error(peft.PromptTuningConfig, **kwargs)
    ours = _error(PromptTuningConfig, **kwargs)
    assert ours == theirs


@pytest.mark.parametrize("init", ["BOGUS", "random", "", None, 3])
def test_unknown_init_is_refused_beyond_peft(init):
    """Deliberately stricter than PEFT (which treats an unknown init as RANDOM): a ValueError naming the
    value and the three choices."""
    assert peft.PromptTuningConfig(prompt_tuning_init=init).prompt_tuning_init == init  # PEFT accepts it
    with pytest.raises(ValueError, match=r"prompt_tuning_init=.*TEXT, SAMPLE_VOCAB, RANDOM"):
        PromptTuningConfig(task_type="CAUSAL_LM", prompt_tuning_init=init)


@pytest.mark.parametrize("init", ["RANDOM", PromptTuningInit.TEXT, peft.PromptTuningInit.SAMPLE_VOCAB])
def test_valid_inits_in_any_spelling(init):
    text = dict(tokenizer_name_or_path="tok", prompt_tuning_init_text="hi") if init == "TEXT" else {}
    config = PromptTuningConfig(task_type="CAUSAL_LM", prompt_tuning_init=init, **text)
    assert to_peft_config(config).prompt_tuning_init == init


def _tiny_causal_lm():
    from fastprompt.testing import tiny_models

    return tiny_models.build("gpt2", "CAUSAL_LM")


@pytest.mark.parametrize("make", ["fastprompt", "peft"])
def test_get_peft_model_without_task_type_names_the_choices(make):
    """PEFT: ``KeyError: None``; fastprompt.get_peft_model: a ValueError listing the task types, for
    fastprompt's and PEFT's own config objects."""
    import fastprompt

    cls = PromptTuningConfig if make == "fastprompt" else peft.PromptTuningConfig
    config = cls(num_virtual_tokens=2)
    with pytest.raises(KeyError):
        peft.get_peft_model(
            _tiny_causal_lm(), cls(num_virtual_tokens=2) if make == "peft" else to_peft_config(config)
        )
    with pytest.raises(ValueError, match=r"task_type=None.*SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM"):
        fastprompt.get_peft_model(_tiny_causal_lm(), config)


def test_get_peft_model_checks_peft_configs_changed_after_construction():
    """PEFT checks its fields in ``__post_init__`` only: values set later reach get_peft_model."""
    import fastprompt

    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    config.task_type = "CASUAL_LM"
    with pytest.raises(ValueError, match=r"task_type='CASUAL_LM'.*CAUSAL_LM"):
        fastprompt.get_peft_model(_tiny_causal_lm(), config)
    config.task_type = "CAUSAL_LM"
    config.prompt_tuning_init = "BOGUS"
    with pytest.raises(ValueError, match=r"prompt_tuning_init='BOGUS'"):
        fastprompt.get_peft_model(_tiny_causal_lm(), config)
    config.prompt_tuning_init = "RANDOM"
    assert (
        fastprompt.get_peft_model(_tiny_causal_lm(), config).peft_config["default"].task_type == "CAUSAL_LM"
    )


def test_peft_type_forced_and_prompt_learning():
    config = PromptTuningConfig(peft_type="LORA", task_type="SEQ_CLS")
    assert config.peft_type == "PROMPT_TUNING" == peft.PeftType.PROMPT_TUNING
    assert config.is_prompt_learning and not config.is_adaption_prompt


def test_conversions_round_trip():
    ours = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=7,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text="hello",
        tokenizer_name_or_path="tok",
        tokenizer_kwargs={"use_fast": True},
    )
    theirs = to_peft_config(ours)
    assert isinstance(theirs, peft.PromptTuningConfig)
    assert theirs.prompt_tuning_init is peft.PromptTuningInit.TEXT
    assert theirs.to_dict() == ours.to_dict()
    back = from_peft_config(theirs)
    assert isinstance(back, PromptTuningConfig) and back.to_dict() == ours.to_dict()
    assert to_peft_config(theirs) is theirs and from_peft_config(ours) is ours


def test_save_pretrained_writes_what_peft_writes(tmp_path):
    kwargs = dict(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=5, token_dim=16)
    PromptTuningConfig(**kwargs).save_pretrained(tmp_path / "ours")
    peft.PromptTuningConfig(**kwargs).save_pretrained(tmp_path / "peft")
    ours = (tmp_path / "ours" / "adapter_config.json").read_text()
    theirs = (tmp_path / "peft" / "adapter_config.json").read_text()
    assert json.loads(ours) == json.loads(theirs)
    assert ours == theirs
    loaded = PromptTuningConfig.from_pretrained(tmp_path / "peft")
    assert loaded.to_dict() == peft.PromptTuningConfig.from_pretrained(str(tmp_path / "peft")).to_dict()


def test_from_pretrained_drops_unknown_keys_with_warning(tmp_path):
    PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["from_the_future"] = 1
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="from_the_future"):
        config = PromptTuningConfig.from_pretrained(tmp_path)
    assert config.num_virtual_tokens == 2


def test_usable_without_peft(tmp_path):
    """``import fastprompt`` and the config / embedding work when PEFT cannot be imported."""
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "import torch, fastprompt\n"
        "from fastprompt import PromptEmbedding, PromptTuningConfig\n"
        "c = PromptTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=3, token_dim=4, "
        "num_transformer_submodules=1, prompt_tuning_init='SAMPLE_VOCAB')\n"
        "e = PromptEmbedding(c, torch.nn.Embedding(10, 4))\n"
        "assert e(torch.arange(3)[None]).shape == (1, 3, 4)\n"
        "assert 'peft' not in {m for m in sys.modules if sys.modules[m] is not None}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
