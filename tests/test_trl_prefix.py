"""Prefix tuning where users train it: TRL's fused LM head, ``SFTTrainer`` as shipped (fused head, gradient
checkpointing on, bf16 autocast), its packing / padding-free batches, and ``DPOTrainer``.

PEFT 0.21.2 cannot train prefix tuning under gradient checkpointing (its forward fails), so the reference
runs are PEFT's without it; fastprompt's run with TRL's defaults. Packed batches are compared with their
documents run alone through PEFT's unpatched forward."""

from __future__ import annotations

import copy

import pytest
import torch

import fastprompt
from fastprompt.testing import tiny_models

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from test_trl_prompt_once import _fresh_accelerator_state  # noqa: E402, F401 - an autouse fixture
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

N = 6


def prefix_config():
    return peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=8
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models.save_tokenizer(tmp_path_factory.mktemp("tokenizer")))


class EncoderCalls:
    """Counts the prefix encoder's forward calls."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.prompt_encoder["default"].register_forward_hook(self._seen)

    def _seen(self, module, args, out):
        self.count += 1

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("checkpointing", [None, False, True], ids=["none", "non-reentrant", "reentrant"])
@pytest.mark.parametrize("family", ["llama", "opt", "gemma3"])
def test_fused_lm_head_equals_peft(family, checkpointing):
    """``model(..., labels=..., fused_lm_head=True)`` (every TRL trainer's loss): the decoder TRL's head calls
    reads the prefix cache; loss, log_probs, entropy and every trainable gradient equal PEFT's (without
    checkpointing: PEFT's forward fails under it)."""
    base = tiny_models.build(family, "CAUSAL_LM")
    add_fused_lm_head(base, outputs=("log_probs", "entropy"))
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(base), prefix_config()).train()
    fast = fastprompt.get_peft_model(copy.deepcopy(base), prefix_config()).train()
    fast.load_state_dict(reference.state_dict())
    if checkpointing is not None:
        fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        fast.enable_input_require_grads()
    ids = torch.randint(4, tiny_models.VOCAB, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    outputs, grads = [], []
    for model in (reference, fast):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
        weight = torch.randn(out.log_probs.shape, generator=torch.Generator().manual_seed(3))
        (out.loss + (out.log_probs * weight).sum()).backward()
        outputs.append(out)
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    for key in ("loss", "log_probs", "entropy"):
        torch.testing.assert_close(outputs[1][key], outputs[0][key], atol=2e-6, rtol=2e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def _sft(tokenizer, output_dir, *, patched: bool, steps: int = 2, max_length=16, **config):
    """({name: every prefix-encoder parameter} after ``steps`` SGD steps, prefix encoder calls, trainer)."""
    if patched:
        fastprompt.patch_peft()
    model = tiny_models.build("llama", "CAUSAL_LM")
    args = trl.SFTConfig(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=0.1,
        use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0,
        max_length=max_length, disable_tqdm=True, optim="sgd", **config,
    )  # fmt: skip
    torch.manual_seed(1)
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": tiny_models.CORPUS * 4}),
        processing_class=tokenizer,
        peft_config=prefix_config(),
    )
    calls = EncoderCalls(trainer.model)
    try:
        trainer.train()
    finally:
        calls.remove()
    module = trainer.model.prompt_encoder["default"]
    return {name: p.detach().clone() for name, p in module.named_parameters()}, calls.count, trainer


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_sft_trainer_as_shipped_trains_like_peft(tokenizer, tmp_path, bf16):
    """``SFTTrainer`` defaults (fused LM head, gradient checkpointing on; ``bf16`` autocast or not): every
    prefix-encoder parameter (the table and the projection MLP) trains as PEFT's does without
    checkpointing (SGD: the parameters move by the gradient itself). With checkpointing PEFT's own run
    fails (the issue's shape mismatch)."""
    with pytest.raises(RuntimeError, match="size of tensor"):
        _sft(tokenizer, tmp_path / "peft-checkpointed", patched=False, steps=1, bf16=bf16)
    reference, _, trainer_peft = _sft(
        tokenizer, tmp_path / "peft", patched=False, bf16=bf16, gradient_checkpointing=False
    )
    params, calls, trainer = _sft(tokenizer, tmp_path / "fast", patched=True, bf16=bf16)
    assert trainer.args.gradient_checkpointing and not trainer_peft.args.gradient_checkpointing
    assert calls == 2  # once per step (not once per row, not again in the recomputation)
    tolerance = 5e-5 if bf16 else 1e-6  # bf16: autocast's rounding of differently ordered sums
    for name in reference:
        torch.testing.assert_close(params[name], reference[name], atol=tolerance, rtol=0, msg=name)


@pytest.mark.parametrize(
    "config",
    [{"packing": True}, {"padding_free": True, "max_length": None}],
    ids=["packing", "padding_free"],
)
def test_sft_trainer_packed_batches_give_each_document_its_prefix(tokenizer, tmp_path, config):
    """``packing=True`` (BFD, padding-free) and ``padding_free=True`` with TRL's defaults: the loss of a
    packed batch (through TRL's fused head) equals its documents run alone through PEFT."""
    _, _, trainer = _sft(tokenizer, tmp_path / "fast", patched=True, steps=1, **config)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(**batch, fused_lm_head=True, use_cache=False)
    fastprompt.unpatch_peft()  # the reference: PEFT's own forward on each document
    reference = peft.get_peft_model(tiny_models.build("llama", "CAUSAL_LM"), prefix_config()).eval()
    reference.load_state_dict(model.state_dict())
    positions = batch["position_ids"][0]
    total = batch["input_ids"].shape[1]
    starts = [*(positions == 0).nonzero().flatten().tolist(), total]
    summed, count = 0.0, 0
    with torch.no_grad():
        for start, end in zip(starts[:-1], starts[1:], strict=True):
            ids, labels = batch["input_ids"][:, start:end], batch["labels"][:, start:end]
            k = int((labels[:, 1:] != -100).sum())
            if k == 0:
                continue
            alone = reference(input_ids=ids, labels=labels)
            summed, count = summed + alone.loss * k, count + k
    assert len(starts) > 3  # several documents in the row
    torch.testing.assert_close(packed.loss, summed / count, atol=1e-5, rtol=1e-5)


def test_dpo_trainer_trains_like_peft(tokenizer, tmp_path):
    """``DPOTrainer`` (chosen and rejected rows in one fused-head forward, the reference pass with the
    adapter disabled), TRL's defaults but fp32: the prefix encoder trains as PEFT's does without
    checkpointing (SGD)."""
    data = datasets.Dataset.from_dict(
        {
            "prompt": ["the movie was", "the food was", "answer the", "translate english"],
            "chosen": [" great", " fine", " question", " to german"],
            "rejected": [" bad", " bad", " text", " hello"],
        }
    )

    def run(patched: bool, output_dir, **config):
        if patched:
            fastprompt.patch_peft()
        args = trl.DPOConfig(
            output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=2, learning_rate=0.1,
            use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0,
            dataloader_num_workers=0, disable_tqdm=True, max_length=16, optim="sgd", bf16=False, **config,
        )  # fmt: skip
        torch.manual_seed(1)
        trainer = trl.DPOTrainer(
            model=tiny_models.build("llama", "CAUSAL_LM"),
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=prefix_config(),
        )
        trainer.train()
        fastprompt.unpatch_peft()
        module = trainer.model.prompt_encoder["default"]
        return {name: p.detach().clone() for name, p in module.named_parameters()}, trainer

    reference, _ = run(False, tmp_path / "peft", gradient_checkpointing=False)
    params, trainer = run(True, tmp_path / "fast")
    assert trainer.args.gradient_checkpointing
    for name in reference:
        torch.testing.assert_close(params[name], reference[name], atol=1e-6, rtol=0, msg=name)
