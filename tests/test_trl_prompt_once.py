"""The prompt run once where users train: TRL's fused LM head (every TRL trainer's loss), ``SFTTrainer`` as
shipped (fused head, gradient checkpointing on), its packing / padding-free batches, and ``DPOTrainer``.
Each against PEFT (or each document run alone through PEFT, for packed rows), and each checking that the
prompt really ran once (the first decoder layer's input lengths)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_helpers import layer0_lengths, reset_accelerator_state

import fastprompt
from fastprompt.prompt_once import policy as shared_prefix
from fastprompt.testing import causal_lms, tiny_models

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

N = 24  # large enough for the default cost rule to share at these batch sizes


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    reset_accelerator_state()
    yield
    reset_accelerator_state()
    fastprompt.unpatch_peft()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models.save_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def _fused_pair(family: str):
    base = tiny_models.build(family, "CAUSAL_LM")
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(1)
    fast = fastprompt.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    return reference.train(), fast.train()


@pytest.mark.parametrize(
    "family,checkpointing",
    [("llama", None), ("llama", False), ("llama", True), ("opt", False), ("qwen2", None), ("gemma3", None)],
)
def test_fused_lm_head_forward_shares_the_prompt_and_equals_peft(family, checkpointing):
    """``model(..., labels=..., fused_lm_head=True)`` (SFT, DPO, GRPO, RLOO, KTO all call it): the prompt runs
    once at the decoder, and TRL's outputs (loss, log_probs, entropy, is_top1, label_mask) and the prompt
    gradient are PEFT's, with and without gradient checkpointing (``use_reentrant`` False / True)."""
    reference, fast = _fused_pair(family)
    for model in (reference, fast):
        if checkpointing is not None:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing}
            )
            if checkpointing:
                model.enable_input_require_grads()
    ids = torch.randint(4, tiny_models.VOCAB, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    seen = layer0_lengths(fast)
    before = shared_prefix.CALLS["shared"]
    outputs, grads = [], []
    for model in (reference, fast):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
        weight = torch.randn(out.log_probs.shape, generator=torch.Generator().manual_seed(3))
        (out.loss + (out.log_probs * weight).sum()).backward()
        outputs.append(out)
        grads.append(model.prompt_encoder["default"].embedding.weight.grad)
    assert shared_prefix.CALLS["shared"] == before + 1
    assert seen[:2] == [N, ids.shape[1]]  # the prompt alone (batch 1), then the rows' tokens
    for key in ("loss", "log_probs", "entropy"):
        torch.testing.assert_close(outputs[1][key], outputs[0][key], atol=2e-6, rtol=2e-6)
    for key in ("is_top1", "label_mask"):
        assert torch.equal(outputs[1][key], outputs[0][key])
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_fused_lm_head_share_true_says_why_not():
    """What the decoder's call carries decides too: a keyword the plan cannot keep exact declines (the
    default takes PEFT's path, ``share_prompt_prefix=True`` raises saying why)."""
    reference, fast = _fused_pair("llama")
    ids = torch.randint(4, tiny_models.VOCAB, (4, 9))
    extra = {"fused_lm_head": True, "use_cache": False, "cache_position": torch.arange(N + 9)}
    with pytest.raises(
        ValueError, match="cannot apply: the decoder was called with keyword 'cache_position'"
    ):
        fast(input_ids=ids, labels=ids, share_prompt_prefix=True, **extra)
    before = dict(shared_prefix.CALLS)
    out = fast(input_ids=ids, labels=ids, **extra)
    torch.testing.assert_close(out.loss, reference(input_ids=ids, labels=ids, **extra).loss)
    assert shared_prefix.CALLS["not shared"] == before.get("not shared", 0) + 1


PROMPT_CONFIGS = {
    "prompt tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "p-tuning": lambda: peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16
    ),
}


def _base(family: str):
    """The tiny Llama of ``tiny_models``, or a tiny model of another family (``causal_lms``)."""
    if family == "llama":
        return tiny_models.build("llama", "CAUSAL_LM")
    return causal_lms.tiny_causal_lm(family, seed=0)


def _sft(
    tokenizer,
    output_dir,
    *,
    patched: bool,
    steps: int = 2,
    max_length=16,
    method="prompt tuning",
    family="llama",
    **config,
):
    """({name: every prompt-module parameter} after ``steps`` SFTTrainer steps, first-layer input lengths,
    the trainer). ``method``: a key of ``PROMPT_CONFIGS``; ``family``: the base model's (:func:`_base`)."""
    if patched:
        fastprompt.patch_peft()
    model = _base(family)
    lengths = []
    model.model.layers[0].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    args = trl.SFTConfig(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=0.1,
        use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0,
        max_length=max_length, disable_tqdm=True, **config,
    )  # fmt: skip
    torch.manual_seed(1)
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": tiny_models.CORPUS * 4}),
        processing_class=tokenizer,
        peft_config=PROMPT_CONFIGS[method](),
    )
    trainer.train()
    module = trainer.model.prompt_encoder["default"]
    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    return params, lengths, trainer


@pytest.mark.parametrize(
    "method,bf16,family",
    [
        ("prompt tuning", False, "llama"),
        ("prompt tuning", True, "llama"),
        ("p-tuning", False, "llama"),
        ("prompt tuning", False, "qwen3"),
    ],
)
def test_sft_trainer_as_shipped_shares_the_prompt(tokenizer, tmp_path, method, bf16, family):
    """``SFTTrainer`` defaults: TRL's fused LM head and gradient checkpointing on, in fp32 and with
    ``bf16=True`` (autocast in both passes), prompt tuning and P-tuning. The prompt runs once per step
    (batch 1, N positions) and every prompt-module parameter (P-tuning: the table and the MLP) trains as
    PEFT's does (SGD: the parameters then move by the gradient itself; Adam's normalization turns
    rounding-order differences of near-zero gradient entries into steps of the learning rate's size)."""
    kwargs = dict(optim="sgd", bf16=bf16, method=method, family=family)
    table_peft, _, trainer_peft = _sft(tokenizer, tmp_path / "peft", patched=False, **kwargs)
    assert trainer_peft.args.gradient_checkpointing  # TRL's default
    before = shared_prefix.CALLS["shared"]
    table, lengths, trainer = _sft(tokenizer, tmp_path / "fast", patched=True, **kwargs)
    assert shared_prefix.CALLS["shared"] == before + 2
    assert lengths[0::2] == [N, N]  # each step: the prompt pass, then the rows (recomputed in backward)
    torch.testing.assert_close(table, table_peft, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config,method,family",
    [
        ({"packing": True}, "prompt tuning", "llama"),
        ({"padding_free": True, "max_length": None}, "prompt tuning", "llama"),
        ({"packing": True}, "p-tuning", "llama"),
        ({"packing": True}, "prompt tuning", "qwen3"),
    ],
    ids=["packing", "padding_free", "packing-p-tuning", "packing-qwen3"],
)
def test_sft_trainer_packed_batches_give_each_document_its_prompt(
    tokenizer, tmp_path, config, method, family
):
    """``packing=True`` (BFD, padding-free) and ``padding_free=True``, prompt tuning and P-tuning: the first
    layer sees ONE prompt for the packed row (``[1, N + T]``), and the loss of a packed batch equals its
    documents run alone through PEFT (TRL's labels: each document's first token ignored)."""
    before = shared_prefix.CALLS["packed shared"]
    _, lengths, trainer = _sft(
        tokenizer, tmp_path / "fast", patched=True, steps=1, method=method, family=family, **config
    )
    assert shared_prefix.CALLS["packed shared"] >= before + 1
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    total = batch["input_ids"].shape[1]
    assert lengths[0] == N + total  # one prompt for the whole row, not one per document

    model = trainer.model.eval()
    positions = batch["position_ids"][0]
    starts = [*(positions == 0).nonzero().flatten().tolist(), total]
    with torch.no_grad():
        packed = model(**batch, fused_lm_head=True, use_cache=False)
        summed, count = 0.0, 0
        for start, end in zip(starts[:-1], starts[1:], strict=True):  # each document alone, PEFT's path
            ids, labels = batch["input_ids"][:, start:end], batch["labels"][:, start:end]
            if (labels != -100).sum() == 0:
                continue
            alone = model(input_ids=ids, labels=labels, share_prompt_prefix=False)
            k = int((labels != -100).sum())
            summed, count = summed + alone.loss * k, count + k
    torch.testing.assert_close(packed.loss, summed / count, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_dpo_trainer_chosen_and_rejected_share_one_prompt_pass(tokenizer, tmp_path, family):
    """``DPOTrainer`` runs chosen and rejected rows in one fused-head forward: one prompt pass for both;
    the reference pass (adapter disabled) stays the base model's; the table trains as PEFT's does (SGD, as
    in the SFT test)."""
    data = datasets.Dataset.from_dict(
        {
            "prompt": ["the movie was", "the food was", "answer the", "translate english"],
            "chosen": [" great", " fine", " question", " to german"],
            "rejected": [" bad", " bad", " text", " hello"],
        }
    )

    def run(patched: bool, output_dir):
        if patched:
            fastprompt.patch_peft()
        model = _base(family)
        lengths = []
        model.model.layers[0].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape))
        args = trl.DPOConfig(
            output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=2, learning_rate=0.1,
            use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0,
            dataloader_num_workers=0, disable_tqdm=True, max_length=16, optim="sgd",
        )  # fmt: skip
        torch.manual_seed(1)
        trainer = trl.DPOTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        )
        trainer.train()
        fastprompt.unpatch_peft()
        return trainer.model.prompt_encoder["default"].embedding.weight.detach().clone(), lengths

    table_peft, _ = run(False, tmp_path / "peft")
    before = shared_prefix.CALLS["shared"]
    table, shapes = run(True, tmp_path / "fast")
    assert shared_prefix.CALLS["shared"] >= before + 2
    prompt_passes = [s for s in shapes if s[1] == N and s[0] == 1]
    assert len(prompt_passes) >= 2  # one per training forward (2 chosen + 2 rejected rows each)
    torch.testing.assert_close(table, table_peft, atol=1e-5, rtol=0)


def test_a_head_of_its_own_shares_at_the_decoder():
    """A user's head that reads the decoder's hidden states (a subclass with its own ``forward``, as Liger's
    fused linear cross-entropy patches the class): the prompt runs once at the decoder; outputs and the
    prompt gradient are PEFT's."""
    from transformers import LlamaForCausalLM

    class MeanPooledHead(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
            hidden = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
            logits = self.lm_head(hidden)  # [B, N + L, V]
            return {"loss": logits.logsumexp(-1).mean(), "logits": logits}

    base = tiny_models.build("llama", "CAUSAL_LM")
    custom = MeanPooledHead(base.config)
    custom.load_state_dict(base.state_dict())
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(custom), config)
    torch.manual_seed(1)
    fast = fastprompt.get_peft_model(copy.deepcopy(custom), copy.deepcopy(config))
    ids = torch.randint(4, tiny_models.VOCAB, (4, 9), generator=torch.Generator().manual_seed(0))
    seen = layer0_lengths(fast)
    before = shared_prefix.CALLS["shared"]
    results = []
    for model in (reference.train(), fast.train()):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        weight = torch.randn(out["logits"].shape, generator=torch.Generator().manual_seed(2))
        (out["loss"] + (out["logits"] * weight).sum()).backward()
        results.append((out["logits"].detach(), model.prompt_encoder["default"].embedding.weight.grad))
    assert shared_prefix.CALLS["shared"] == before + 1 and seen == [N, ids.shape[1]]
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-5)
