"""TRL's ``SFTTrainer(model, peft_config=PromptTuningConfig(...))`` after ``fastprompt.patch_peft()``: how
most users fine-tune. Same prompt table as PEFT's own run, in fp32 and with ``bf16=True`` (autocast inside
the base model at every step), through the fused op."""

from __future__ import annotations

import pytest
import torch
from peft_helpers import FastpromptOps, reset_accelerator_state

import fastprompt
from fastprompt.testing import tiny_models

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

STEPS = 4


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Each run builds its own Accelerator (bf16 or not): no accelerate state left over either way."""
    reset_accelerator_state()
    yield
    reset_accelerator_state()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models.save_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def _sft(tokenizer, output_dir, *, patched: bool, bf16: bool):
    """(prompt table after ``STEPS`` steps, autocast states seen in the first decoder layer, fused calls)."""
    if patched:
        fastprompt.patch_peft()
    try:
        model = tiny_models.build("llama", "CAUSAL_LM")
        seen: list[bool] = []
        model.model.layers[0].register_forward_pre_hook(
            lambda module, args: seen.append(torch.is_autocast_enabled("cpu"))
        )
        args = trl.SFTConfig(
            output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=0.1,
            bf16=bf16, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0,
            dataloader_num_workers=0, max_length=16, disable_tqdm=True,
        )  # fmt: skip
        torch.manual_seed(1)  # the prompt table's RANDOM init
        trainer = trl.SFTTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_dict({"text": tiny_models.CORPUS * 2}),
            processing_class=tokenizer,
            peft_config=peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        )
        weight = trainer.model.prompt_encoder["default"].embedding.weight
        before = weight.detach().clone()
        with FastpromptOps() as ops:
            trainer.train()
        assert not torch.equal(weight, before)  # it trained
        return weight.detach().clone(), seen, ops.forward
    finally:
        fastprompt.unpatch_peft()


@pytest.mark.parametrize("bf16", [False, True])
def test_sft_trainer_after_patch_peft_trains_like_peft(tokenizer, tmp_path, bf16):
    table_peft, seen_peft, calls_peft = _sft(tokenizer, tmp_path / "peft", patched=False, bf16=bf16)
    table, seen, calls = _sft(tokenizer, tmp_path / "fast", patched=True, bf16=bf16)
    assert calls_peft == 0 and calls == STEPS
    assert seen_peft == [bf16] * STEPS and seen == [bf16] * STEPS
    torch.testing.assert_close(table, table_peft, atol=0, rtol=0)
