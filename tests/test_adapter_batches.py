"""Mixed-adapter batches: ``peft_model(..., adapter_names=[one prompt-tuning adapter per row])``.

The reference for every row is independent of fastprompt's path: the base model called with that row's
prompt rows (its adapter's table) and token rows, cast and concatenated by hand, the mask prefixed with
ones and the labels with -100, as PEFT does for one adapter. Each row must also equal that row run alone
after ``set_adapter(its adapter)``.
"""

from __future__ import annotations

import pytest
import tiny_models
import torch
from peft_helpers import FastpromptOps, main_output, peft_config

peft = pytest.importorskip("peft")
import fastprompt  # noqa: E402

N = 3
NAMES = ["a", "b", "a", "c"]  # batch rows -> adapters; "c" and "a" twice, "b" once


def _model(family: str, task: str, seed: int = 0, adapters=("a", "b", "c"), n=N):
    base = tiny_models.build(family, task, seed=seed)
    torch.manual_seed(seed + 1)
    model = fastprompt.get_peft_model(base, peft_config(task, n), adapter_name=adapters[0])
    for k, name in enumerate(adapters[1:]):
        torch.manual_seed(seed + 2 + k)
        model.add_adapter(name, peft_config(task, n))
    if task in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):
        # the heads of each adapter are modules_to_save copies: make them agree so rows are comparable
        state = {k: v for k, v in model.state_dict().items() if "modules_to_save" in k}
        for key in state:
            for name in adapters[1:]:
                other = key.replace(f".{adapters[0]}.", f".{name}.")
                if other in state:
                    state[other] = state[key]
        model.load_state_dict(state, strict=False)
    return model.eval()


def _table(model, name):
    return model.prompt_encoder[name].embedding.weight


def _inputs(batch=4, seq_len=6, seed=0, **kwargs):
    return tiny_models.batch(batch, seq_len, seed=seed, **kwargs)


def _reference_embeds(model, input_ids, names, n=N):
    tokens = model.word_embeddings(input_ids)
    prompts = torch.stack([_table(model, name)[:n] for name in names]).to(tokens.dtype)
    return torch.cat((prompts, tokens), dim=1)


def _prefixed(mask, n=N):
    return torch.cat((torch.ones(mask.shape[0], n), mask), dim=1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_lm_rows_logits_loss_and_grads(backend, family):
    model = _model(family, "CAUSAL_LM")
    inputs = _inputs()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with FastpromptOps() as ops:
        out = model(**inputs, labels=labels, adapter_names=NAMES)
    assert ops.forward == 1  # one fused call for the whole mixed batch

    reference_embeds = _reference_embeds(model, inputs["input_ids"], NAMES)
    prefixed_labels = torch.cat((torch.full((4, N), -100), labels), dim=1)
    expected = model.base_model(
        inputs_embeds=reference_embeds,
        attention_mask=_prefixed(inputs["attention_mask"]),
        labels=prefixed_labels,
    )
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-6, rtol=1e-6)

    grad = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(3))
    tables = [_table(model, name) for name in ("a", "b", "c")]
    got = torch.autograd.grad(out.logits, tables, grad)
    want = torch.autograd.grad(expected.logits, tables, grad)
    for name, g, w in zip("abc", got, want, strict=True):
        assert g.abs().sum() > 0, f"adapter {name} in the batch got no gradient"
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)

    # each row equals that row alone with set_adapter (same padding)
    for row, name in enumerate(NAMES):
        model.set_adapter(name)
        alone = model(**{k: v[row : row + 1] for k, v in inputs.items()}).logits
        torch.testing.assert_close(out.logits[row : row + 1], alone, atol=1e-5, rtol=1e-5)
    model.set_adapter("a")


def test_unused_adapter_gets_no_gradient_and_optimizer_moves_used_ones():
    model = _model("llama", "CAUSAL_LM")
    model.train()
    before = {name: _table(model, name).detach().clone() for name in "abc"}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    inputs = _inputs()
    out = model(**inputs, labels=inputs["input_ids"], adapter_names=["a", "b", "a", "b"])
    out.loss.backward()
    assert _table(model, "c").grad is None or not _table(model, "c").grad.any()
    optimizer.step()
    assert not torch.equal(_table(model, "a"), before["a"])
    assert not torch.equal(_table(model, "b"), before["b"])
    assert torch.equal(_table(model, "c"), before["c"])


def test_gradient_checkpointing_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = _model("llama", "CAUSAL_LM")
        model.train()
        if checkpointing:
            model.base_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": True}
            )
            model.base_model.enable_input_require_grads()
        inputs = _inputs()
        with FastpromptOps() as ops:
            loss = model(**inputs, labels=inputs["input_ids"], adapter_names=NAMES).loss
        loss.backward()
        assert ops.forward >= 1
        grads.append([_table(model, name).grad.clone() for name in "abc"])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "family,task",
    [("bert", "SEQ_CLS"), ("bert", "TOKEN_CLS"), ("bert", "QUESTION_ANS"), ("bert", "FEATURE_EXTRACTION")],
)
def test_encoder_tasks_rows_match_reference(backend, family, task):
    model = _model(family, task)
    inputs = _inputs(token_type_ids=True)
    with FastpromptOps() as ops:
        out = model(**inputs, adapter_names=NAMES)
    assert ops.forward == 1
    extra = {}
    if task in ("SEQ_CLS", "TOKEN_CLS"):  # PEFT prefixes them with zeros; QA and features drop them
        extra["token_type_ids"] = torch.cat(
            (torch.zeros(4, N, dtype=torch.long), inputs["token_type_ids"]), 1
        )
    expected = model.base_model(
        inputs_embeds=_reference_embeds(model, inputs["input_ids"], NAMES),
        attention_mask=_prefixed(inputs["attention_mask"]),
        **extra,
    )
    torch.testing.assert_close(main_output(out), main_output(expected), atol=1e-6, rtol=1e-6)
    for row, name in enumerate(NAMES):
        model.set_adapter(name)
        alone = main_output(model(**{k: v[row : row + 1] for k, v in inputs.items()}))
        torch.testing.assert_close(main_output(out)[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_seq_cls_loss_and_grads():
    model = _model("bert", "SEQ_CLS")
    inputs = _inputs()
    labels = torch.tensor([0, 2, 1, 0])
    out = model(**inputs, labels=labels, adapter_names=NAMES)
    expected = model.base_model(
        inputs_embeds=_reference_embeds(model, inputs["input_ids"], NAMES),
        attention_mask=_prefixed(inputs["attention_mask"]),
        labels=labels,
    )
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-6, rtol=1e-6)
    tables = [_table(model, name) for name in "abc"]
    for g, w in zip(
        torch.autograd.grad(out.loss, tables), torch.autograd.grad(expected.loss, tables), strict=True
    ):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_seq2seq_forward_and_generate(backend):
    model = _model("t5", "SEQ_2_SEQ_LM")
    inputs = _inputs()
    decoder_input_ids = torch.randint(
        4, tiny_models.VOCAB, (4, 3), generator=torch.Generator().manual_seed(5)
    )
    with FastpromptOps() as ops:
        out = model(**inputs, decoder_input_ids=decoder_input_ids, adapter_names=NAMES)
    assert ops.forward == 1
    expected = model.base_model(
        inputs_embeds=_reference_embeds(model, inputs["input_ids"], NAMES),  # N of the 2N rows
        attention_mask=_prefixed(inputs["attention_mask"]),
        decoder_input_ids=decoder_input_ids,
    )
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-6, rtol=1e-6)
    grad = torch.randn(out.logits.shape)
    for name, g in zip(
        "abc", torch.autograd.grad(out.logits, [_table(model, n) for n in "abc"], grad), strict=True
    ):
        assert not g[N:].any(), f"rows N.. of adapter {name}'s 2N-row table are never used"

    for mode in (dict(num_beams=1), dict(num_beams=3, num_return_sequences=2)):
        settings = dict(max_new_tokens=4, do_sample=False, **mode)
        with FastpromptOps() as ops:
            mixed = model.generate(**inputs, adapter_names=NAMES, **settings)
        assert ops.forward == 1
        per_row = mode.get("num_return_sequences", 1)
        for row, name in enumerate(NAMES):
            model.set_adapter(name)
            alone = model.generate(**{k: v[row : row + 1] for k, v in inputs.items()}, **settings)
            got = mixed[row * per_row : (row + 1) * per_row]
            assert torch.equal(got[:, : alone.shape[1]], alone), (mode, row, name)
        model.set_adapter("a")


def test_without_adapter_names_unchanged():
    model = _model("llama", "CAUSAL_LM")
    inputs = _inputs()
    model.set_adapter("b")
    expected = model.base_model(
        inputs_embeds=_reference_embeds(model, inputs["input_ids"], ["b"] * 4),
        attention_mask=_prefixed(inputs["attention_mask"]),
    ).logits
    assert torch.equal(model(**inputs).logits, expected)
    assert torch.equal(model(**inputs, adapter_names=["b"] * 4).logits, expected)


def test_trainer_with_a_dataset_column_of_adapter_names(tmp_path):
    import transformers

    from fastprompt.integrations import AdapterNamesCollator

    model = _model("llama", "CAUSAL_LM")
    before = {name: _table(model, name).detach().clone() for name in "abc"}
    ids = _inputs(batch=8, seq_len=5, left_pad=False)["input_ids"]
    examples = [{"input_ids": ids[i], "labels": ids[i], "adapter_names": ["a", "b"][i % 2]} for i in range(8)]

    class Dataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return examples[i]

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=0.5,
        report_to=[], use_cpu=True, save_strategy="no", remove_unused_columns=False,
    )  # fmt: skip
    seen = []
    original = type(model).forward

    def spy(self, *a, **kw):
        seen.append(kw.get("adapter_names"))
        return original(self, *a, **kw)

    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Dataset(), data_collator=AdapterNamesCollator()
    )
    type(model).forward = spy
    try:
        with FastpromptOps() as ops:
            trainer.train()
    finally:
        type(model).forward = original
    assert ops.forward >= 2 and seen and all(names == ["a", "b", "a", "b"] for names in seen)
    assert not torch.equal(_table(model, "a"), before["a"])
    assert not torch.equal(_table(model, "b"), before["b"])
    assert torch.equal(_table(model, "c"), before["c"])


def test_signature_lists_adapter_names():
    import inspect

    model = _model("llama", "CAUSAL_LM")
    assert "adapter_names" in inspect.signature(model.forward).parameters


@pytest.mark.parametrize(
    "names,error,match",
    [
        (["a", "b", "zzz", "a"], ValueError, r"'zzz'.*\['a', 'b', 'c'\]"),
        (["a", "b"], ValueError, r"2 names but the batch has 4 rows"),
        ("a", TypeError, "list"),
        (torch.tensor([0, 1, 0, 1]), TypeError, "list"),
        (["a", "b", 3, "a"], TypeError, "str"),
    ],
)
def test_bad_adapter_names(names, error, match):
    model = _model("llama", "CAUSAL_LM")
    with pytest.raises(error, match=match):
        model(**_inputs(), adapter_names=names)


def test_adapter_names_with_inputs_embeds_or_other_adapter_types():
    model = _model("llama", "CAUSAL_LM")
    inputs = _inputs()
    embeds = model.word_embeddings(inputs["input_ids"])
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], adapter_names=NAMES)
    model.peft_config["lora"] = peft.LoraConfig(task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="'lora', which is not a prompt-tuning adapter"):
        model(**inputs, adapter_names=["a", "lora", "a", "a"])


def test_different_num_virtual_tokens_is_a_clear_error():
    model = _model("llama", "CAUSAL_LM", adapters=("a", "b"))
    torch.manual_seed(9)
    model.add_adapter("long", peft_config("CAUSAL_LM", 5))
    with pytest.raises(ValueError, match=r"'a': N=3, 'long': N=5"):
        model(**_inputs(), adapter_names=["a", "long", "a", "b"])


def test_collator_needs_the_column_in_every_example():
    from fastprompt import AdapterNamesCollator

    collate = AdapterNamesCollator()
    batch = collate([{"input_ids": torch.tensor([5, 6]), "adapter_names": "a"}] * 2)
    assert batch["adapter_names"] == ["a", "a"] and batch["input_ids"].shape == (2, 2)
    with pytest.raises(KeyError, match="example 1"):
        collate([{"input_ids": torch.tensor([5]), "adapter_names": "a"}, {"input_ids": torch.tensor([6])}])


def test_patch_peft_models_take_adapter_names():
    base = tiny_models.build("gpt2", "CAUSAL_LM")
    fastprompt.patch_peft()
    try:
        torch.manual_seed(1)
        model = peft.get_peft_model(base, peft_config("CAUSAL_LM"), adapter_name="a")
        torch.manual_seed(2)
        model.add_adapter("b", peft_config("CAUSAL_LM"))
        inputs = _inputs()
        with FastpromptOps() as ops:
            out = model.eval()(**inputs, adapter_names=["b", "a", "a", "b"])
        assert ops.forward == 1
        expected = model.base_model(
            inputs_embeds=_reference_embeds(model, inputs["input_ids"], ["b", "a", "a", "b"]),
            attention_mask=_prefixed(inputs["attention_mask"]),
        )
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-6, rtol=1e-6)
    finally:
        fastprompt.unpatch_peft()
