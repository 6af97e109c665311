"""Reading PEFT prompt-tuning adapter files without PEFT (``prompted_embeds.adapter_files``)."""

from __future__ import annotations

import os

import pytest
import torch

import fastprompt
from fastprompt.prompted_embeds.adapter_files import AdapterFileError, load_prompt_adapter
from fastprompt.testing.adapter_files import SERVING_BAD_FILES, corrupt_adapter, save_prompt_adapter


def _table(rows=5, dim=16, seed=0):
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bin", [False, True], ids=["safetensors", "bin"])
def test_reads_both_formats(tmp_path, bin):
    table = _table()
    save_prompt_adapter(tmp_path, table, bin=bin)
    adapter = load_prompt_adapter(tmp_path, model_dim=16)
    assert torch.equal(adapter.table, table) and adapter.table.dtype == torch.float32
    assert adapter.config["num_virtual_tokens"] == 5 and adapter.config["token_dim"] == 16
    name = "adapter_model.bin" if bin else "adapter_model.safetensors"
    assert adapter.weights_file == os.path.join(str(tmp_path), name)


def test_reads_what_peft_saves(tmp_path):
    peft = pytest.importorskip("peft")
    from fastprompt.testing import tiny_models

    model = peft.get_peft_model(
        tiny_models.build("llama", "CAUSAL_LM"),
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    )
    model.save_pretrained(tmp_path)
    adapter = load_prompt_adapter(tmp_path, model_dim=tiny_models.HIDDEN)
    assert torch.equal(adapter.table, model.prompt_encoder["default"].embedding.weight.detach())


@pytest.mark.parametrize("how", SERVING_BAD_FILES)
def test_bad_files_name_the_file_and_the_problem(tmp_path, how):
    save_prompt_adapter(tmp_path, _table())
    corrupt_adapter(tmp_path, how)
    expected = {
        "truncated": r"adapter_model\.safetensors is not a readable safetensors file",
        "garbage": r"adapter_model\.safetensors is not a readable safetensors file",
        "missing_key": r"adapter_model\.safetensors has no 'prompt_embeddings' tensor",
        "wrong_shape": r"adapter_model\.safetensors: 'prompt_embeddings' has shape \[2, 16\]",
        "wrong_dim": r"adapter_config\.json has token_dim=32, but the model's word embeddings have dim",
        "no_weights": r"No adapter weights in .*: expected adapter_model\.safetensors",
        "nan": r"adapter_model\.safetensors: 'prompt_embeddings' holds 2 of 80 values that are not finite",
        "inf": r"adapter_model\.safetensors: 'prompt_embeddings' holds 2 of 80 values that are not finite",
        "nan_bin": r"adapter_model\.bin: 'prompt_embeddings' holds 2 of 80 values that are not finite",
        "lora_config": r"adapter_config\.json has peft_type='LORA', expected 'PROMPT_TUNING'",
        "broken_config": r"Cannot read .*adapter_config\.json",
        "no_config": r"No adapter_config\.json in ",
    }[how]
    with pytest.raises(fastprompt.AdapterFileError, match=expected) as info:
        load_prompt_adapter(tmp_path, model_dim=16)
    assert str(tmp_path) in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        load_prompt_adapter(tmp_path / "nowhere")


def test_error_is_the_same_class_everywhere():
    from fastprompt import integrations

    assert fastprompt.AdapterFileError is integrations.AdapterFileError is AdapterFileError
