"""P-tuning (PEFT's ``P_TUNING``: the N rows from an MLP or LSTM encoder) on fastprompt's machinery.

Reference: PEFT's own model built from the same weights (``peft.get_peft_model``). Checked equal within
fp32 rounding: loss, logits and the gradient of every trainable encoder parameter (embedding, MLP / LSTM
weights) under random upstream gradients; the fused concat taken (one ``prompt_concat`` per forward, its
rows the encoder's output), the shared prompt prefix (one prompt pass per batch), prompt-KV reuse in
``generate`` (never stale after an optimizer step on the encoder), mixed batches of P-tuning adapters,
the stored rows of a loaded adapter (``inference_mode``), ``patch_peft`` and ``from_pretrained``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft_helpers import FastpromptOps, assert_same_step, uncached_greedy, with_labels

from fastprompt.testing import tiny_models

peft = pytest.importorskip("peft")
import fastprompt  # noqa: E402
from fastprompt.integrations import CALLS  # noqa: E402
from fastprompt.integrations.peft_methods import FastPromptModel  # noqa: E402
from fastprompt.prompt_once import kv_store  # noqa: E402
from fastprompt.prompt_once.policy import CALLS as SHARE_CALLS  # noqa: E402
from fastprompt.prompted_embeds.prompt_rows import prompt_table  # noqa: E402

N = 5
FP32 = dict(rtol=1e-5, atol=1e-5)
ENCODERS = ["MLP", "LSTM"]


def ptuning_config(task: str, encoder: str = "MLP", n: int = N, **kwargs):
    return peft.PromptEncoderConfig(
        task_type=task,
        num_virtual_tokens=n,
        encoder_hidden_size=16,
        encoder_reparameterization_type=encoder,
        **kwargs,
    )


def pair(family: str, task: str, encoder: str = "MLP", n: int = N, seed: int = 0):
    """(PEFT model, fastprompt model) with the same base and encoder weights, in eval mode."""
    base = tiny_models.build(family, task, seed=seed)
    torch.manual_seed(seed + 1)
    reference = peft.get_peft_model(copy.deepcopy(base), ptuning_config(task, encoder, n))
    torch.manual_seed(seed + 2)  # another init, overwritten: the state dicts must carry everything
    fast = fastprompt.get_peft_model(copy.deepcopy(base), ptuning_config(task, encoder, n))
    fast.load_state_dict(reference.state_dict())
    return reference.eval(), fast.eval()


def _inputs(task: str, batch: int = 3, seq: int = 6) -> dict:
    return with_labels(tiny_models.batch(batch, seq), task)


def test_prompt_table_is_the_encoders_output_not_its_table():
    """P-tuning's and multitask's modules have an ``embedding`` too: they are not plain tables."""
    reference, _ = pair("llama", "CAUSAL_LM")
    assert prompt_table(reference.prompt_encoder["default"]) is None
    base = tiny_models.build("llama", "CAUSAL_LM")
    multitask = peft.get_peft_model(
        base, peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, num_tasks=2)
    )
    assert prompt_table(multitask.prompt_encoder["default"]) is None
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    prompt = peft.get_peft_model(tiny_models.build("llama", "CAUSAL_LM"), config)
    table = prompt.prompt_encoder["default"]
    assert prompt_table(table) is table.embedding.weight
    ours = fastprompt.PromptEmbedding(prompt.peft_config["default"], prompt.word_embeddings)
    assert prompt_table(ours) is ours.embedding.weight


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize(
    "family,task",
    [
        ("llama", "CAUSAL_LM"),
        ("gpt2", "CAUSAL_LM"),
        ("t5", "SEQ_2_SEQ_LM"),
        ("bert", "SEQ_CLS"),
        ("opt", "FEATURE_EXTRACTION"),
    ],
)
def test_fused_forward_backward_equal_peft(family, task, encoder):
    """The fused path (sharing off): one prompt_concat whose rows are the encoder's output."""
    reference, fast = pair(family, task, encoder)
    trainable = [name for name, p in reference.named_parameters() if p.requires_grad]
    assert any(f"{encoder.lower()}_head" in name for name in trainable)  # the encoder's own weights
    reference.train()
    fast.train()
    before = CALLS["fused"]
    with FastpromptOps() as ops:
        assert_same_step(reference, fast, _inputs(task), share_prompt_prefix=False)
    assert ops.forward == 1
    assert CALLS["fused"] == before + 1


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_shared_prefix_equal_peft(family, encoder):
    """One prompt pass per batch: the encoder runs once, every row's gradient flows back into it."""
    reference, fast = pair(family, "CAUSAL_LM", encoder, n=12)
    inputs = _inputs("CAUSAL_LM", batch=4)
    before = SHARE_CALLS["shared"]
    got = assert_same_step(reference, fast, inputs, share_prompt_prefix=True)
    assert SHARE_CALLS["shared"] == before + 1
    assert got.logits.shape[1] == 12 + inputs["input_ids"].shape[1]


def test_lstm_dropout_in_training_equals_peft():
    """encoder_dropout in the LSTM (training mode): PEFT runs the encoder once per forward, so do we."""
    base = tiny_models.build("llama", "CAUSAL_LM")
    config = ptuning_config("CAUSAL_LM", "LSTM", encoder_dropout=0.3)
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    fast = fastprompt.get_peft_model(copy.deepcopy(base), config)
    fast.load_state_dict(reference.state_dict())
    reference.train()
    fast.train()
    inputs = _inputs("CAUSAL_LM")
    for share in (False, True):
        torch.manual_seed(5)
        expected = reference(**inputs)
        torch.manual_seed(5)
        got = fast(**inputs, share_prompt_prefix=share)
        torch.testing.assert_close(got.logits, expected.logits, **FP32)


def test_mixed_ptuning_adapters():
    """adapter_names across two P-tuning adapters of one N: each row equals its adapter run alone, one
    fused call, and each encoder gets exactly its rows' gradient."""
    _, fast = pair("llama", "CAUSAL_LM")
    torch.manual_seed(9)
    fast.add_adapter("other", ptuning_config("CAUSAL_LM", "LSTM"))
    fast.eval()
    inputs = _inputs("CAUSAL_LM", batch=4)
    names = ["other", "default", "other", "default"]
    for share in (False, True):
        fast.zero_grad(set_to_none=True)
        with FastpromptOps() as ops:
            mixed = fast(**inputs, adapter_names=names, share_prompt_prefix=share)
        assert ops.forward == (0 if share else 1)
        upstream = torch.randn(mixed.logits.shape, generator=torch.Generator().manual_seed(2))
        (mixed.logits * upstream).sum().backward()
        grads = {n: p.grad.clone() for n, p in fast.named_parameters() if p.grad is not None}
        assert any(".other." in n for n in grads) and any(".default." in n for n in grads)
        for name in ("default", "other"):
            rows = [i for i, row_name in enumerate(names) if row_name == name]
            fast.set_adapter(name)
            fast.zero_grad(set_to_none=True)
            alone = fast(**{k: v[rows] for k, v in inputs.items()}, share_prompt_prefix=False)
            torch.testing.assert_close(mixed.logits[rows], alone.logits, **FP32)
            (alone.logits * upstream[rows]).sum().backward()
            for n, p in fast.named_parameters():
                if f".{name}." in n and p.requires_grad:
                    torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-5)
        fast.set_adapter("default")


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_equals_uncached_reference(family, encoder):
    """Correct cached generation on transformers >= 5.24 (PEFT's own cached generation is not there),
    with and without prompt-KV reuse."""
    reference, fast = pair(family, "CAUSAL_LM", encoder)
    ids = tiny_models.batch(2, 4, left_pad=False)["input_ids"]
    expected = uncached_greedy(reference, ids, 5)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tiny_models.PAD)
    mask = torch.ones_like(ids)
    for reuse in (True, False):
        got = fast.generate(input_ids=ids, attention_mask=mask, reuse_prompt_kv=reuse, **kwargs)
        assert torch.equal(got, expected), (reuse, got, expected)
    beams = dict(num_beams=3, num_return_sequences=2, **kwargs)
    assert torch.equal(
        fast.generate(input_ids=ids, **beams), fast.generate(input_ids=ids, reuse_prompt_kv=False, **beams)
    )


def test_prompt_kv_is_never_stale_after_an_encoder_step():
    """The store compares the encoder's output: an optimizer step on the MLP alone (the embedding
    table frozen) must recompute the prompt keys/values."""
    _, fast = pair("llama", "CAUSAL_LM")
    ids = tiny_models.batch(2, 4, left_pad=False)["input_ids"]
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tiny_models.PAD)
    store = kv_store.prompt_kv_store(fast)
    store.clear()
    fast.generate(input_ids=ids, **kwargs)
    computed = kv_store.CALLS["computed"]
    fast.generate(input_ids=ids, **kwargs)
    assert kv_store.CALLS["computed"] == computed  # reused
    encoder = fast.prompt_encoder["default"]
    encoder.embedding.weight.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in encoder.parameters() if p.requires_grad], lr=5.0)
    fast.train()
    loss = fast(**_inputs("CAUSAL_LM")).loss
    loss.backward()
    optimizer.step()
    fast.eval()
    after = fast.generate(input_ids=ids, **kwargs)
    assert kv_store.CALLS["computed"] == computed + 1
    assert torch.equal(after, fast.generate(input_ids=ids, reuse_prompt_kv=False, **kwargs))


def test_stored_rows_save_load_and_patch_peft(tmp_path):
    """PEFT stores the encoder's output (``prompt_embeddings``); a loaded adapter is inference_mode and
    reads those rows as they are: through from_pretrained under patch_peft, the fused path gives PEFT's
    logits, equal to the trained model's."""
    reference, fast = pair("llama", "CAUSAL_LM")
    inputs = _inputs("CAUSAL_LM")
    inputs.pop("labels")
    trained = fast(**inputs, share_prompt_prefix=False).logits
    fast.save_pretrained(tmp_path)
    base = tiny_models.build("llama", "CAUSAL_LM")
    peft_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    expected_logits = peft_loaded(**inputs).logits  # before patch_peft: PEFT's own forward
    fastprompt.patch_peft()
    try:
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        assert loaded.peft_config["default"].inference_mode
        assert not hasattr(loaded.prompt_encoder["default"], "mlp_head")
        before = CALLS["fused"]
        for share in (False, True):
            got = loaded(**inputs, share_prompt_prefix=share).logits
            torch.testing.assert_close(got, expected_logits, **FP32)
            torch.testing.assert_close(got, trained, **FP32)
        assert CALLS["fused"] == before + 1
        ids = inputs["input_ids"][:2, 2:]
        expected = uncached_greedy(peft_loaded, ids, 4)
        got = loaded.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.equal(got, expected)
        # an ordinary PEFT-built P-tuning model under patch_peft takes the fused path too
        torch.manual_seed(0)
        patched = peft.get_peft_model(copy.deepcopy(base), ptuning_config("CAUSAL_LM")).eval()
        with FastpromptOps() as ops:
            patched(**inputs, share_prompt_prefix=False)
        assert ops.forward == 1
    finally:
        fastprompt.unpatch_peft()


def _stays_peft_config(method: str):
    if method == "cpt":
        return peft.CPTConfig(
            task_type="CAUSAL_LM",
            cpt_token_ids=[5, 6, 7, 8, 9],
            cpt_mask=[1, 1, 1, 1, 1],
            cpt_tokens_type_mask=[1, 2, 2, 3, 3],
        )
    return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)


@pytest.mark.parametrize("method", ["cpt"])  # prefix tuning is fastprompt's: tests/test_prefix_tuning.py
def test_prefix_tuning_and_cpt_stay_peft(tmp_path, method):
    """CPT is left to PEFT: ``get_peft_model`` / ``accelerate`` return PEFT's model as it
    is, and under ``patch_peft`` nothing of theirs changes: no fused op, the same logits, loss, gradient,
    generated tokens and saved files as PEFT alone."""
    base = tiny_models.build("llama", "CAUSAL_LM")
    config = _stays_peft_config(method)
    model = fastprompt.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    assert not isinstance(model, FastPromptModel)
    assert fastprompt.accelerate(model) is model and not isinstance(model, FastPromptModel)
    inputs = _inputs("CAUSAL_LM")
    if method == "cpt":
        inputs["input_type_mask"] = torch.full_like(inputs["input_ids"], 4)
    ids = inputs["input_ids"][:2, 2:]

    def run(directory):
        torch.manual_seed(0)
        peft_model = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
        out = peft_model(**inputs)
        out.logits.sum().backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
        tokens = peft_model.eval().generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        peft_model.save_pretrained(directory)
        return out, grads, tokens

    expected, expected_grads, expected_tokens = run(tmp_path / "peft")
    fastprompt.patch_peft()
    try:
        with FastpromptOps() as ops:
            got, grads, tokens = run(tmp_path / "patched")
        assert ops.names == []
    finally:
        fastprompt.unpatch_peft()
    assert torch.equal(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0, equal_nan=True)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in expected_grads.items():
        assert torch.equal(grads[name], grad), name
    assert torch.equal(tokens, expected_tokens)
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "patched" / file).read_bytes() == (tmp_path / "peft" / file).read_bytes()


def test_seq2seq_generate_equals_peft():
    """Seq2Seq generate: the encoder's N of the 2N encoder-output rows before the encoder inputs, as PEFT."""
    reference, fast = pair("t5", "SEQ_2_SEQ_LM")
    ids = tiny_models.batch(2, 5, left_pad=False)["input_ids"]
    expected = reference.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    with FastpromptOps() as ops:
        got = fast.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)
    assert ops.forward == 1
