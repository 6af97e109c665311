"""Packed / padding-free rows (beyond PEFT): each document with its own soft prompt, equal to the document
run alone through PEFT (loss, every token's logits, the prompt gradient), on every layout and attention
implementation, and the clear errors where it cannot be exact."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from peft_helpers import layer0_lengths, model_pair

from fastprompt.prompt_once import packed
from fastprompt.prompt_once import policy as shared_prefix
from fastprompt.testing import tiny_models

peft = pytest.importorskip("peft")

N = 6
LENGTHS = (7, 12, 5, 9)


def _documents(lengths=LENGTHS, *, first_label: str = "trl", seed: int = 0):
    """(docs, their labels): random token ids; TRL's labels ignore each document's first token."""
    generator = torch.Generator().manual_seed(seed)
    docs = [torch.randint(4, tiny_models.VOCAB, (length,), generator=generator) for length in lengths]
    labels = [doc.clone() for doc in docs]
    if first_label == "trl":
        for label in labels:
            label[0] = -100
    return docs, labels


def _packed(docs, labels):
    """One packed row: ids, position_ids restarting per document, labels ([1, T] each)."""
    positions = torch.cat([torch.arange(len(doc)) for doc in docs])
    return torch.cat(docs)[None], positions[None], torch.cat(labels)[None]


def _set_attention(model, implementation: str) -> None:
    model.get_base_model().set_attn_implementation(implementation)


def _alone(reference, docs, labels, weights):
    """Each document alone through PEFT: the summed-CE loss over all labels, each document's logits,
    and the prompt gradient of ``loss + sum(logits * weights)`` (``weights``: per document, random)."""
    reference.zero_grad()
    total, logits = 0.0, []
    for doc, label, weight in zip(docs, labels, weights, strict=True):
        out = reference(input_ids=doc[None], attention_mask=torch.ones(1, len(doc), dtype=torch.long))
        logits.append(out.logits[0].detach())
        shifted = torch.cat((torch.full((N,), -100), label))[1:]
        ce = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), shifted, reduction="sum")
        total = total + ce + (out.logits[0, N:] * weight).sum()
    total.backward()
    return logits, reference.prompt_encoder["default"].embedding.weight.grad.clone()


def _reference_loss(reference, docs, labels):
    with torch.no_grad():
        total, count = 0.0, 0
        for doc, label in zip(docs, labels, strict=True):
            out = reference(input_ids=doc[None], labels=label[None])
            k = int((label != -100).sum())
            total, count = total + out.loss * k, count + k
        return total / count


def _check(
    family, implementation, share, first_label, *, config=None, lengths=LENGTHS, prepare=None,
    context=contextlib.nullcontext, tolerance=1.0,
):  # fmt: skip
    """The packed row of ``lengths`` documents through ``fast`` against each document alone through PEFT:
    loss, every token's and the prompt's logits, the prompt gradient of the loss plus random weights on the
    logits, the path taken and the first layer's lengths (the prompt once per row, or once per document).
    ``prepare(fast)`` before the call; ``context()`` around both; ``tolerance`` scales the tolerances."""
    reference, fast = model_pair(family, "CAUSAL_LM", num_virtual_tokens=N)
    if config:
        for model in (reference, fast):
            for key, value in config.items():
                setattr(model.get_base_model().config, key, value)
    for model in (reference, fast):
        _set_attention(model, implementation)
        model.train()
    docs, labels = _documents(lengths, first_label=first_label)
    weights = [
        torch.randn(len(doc), tiny_models.VOCAB, generator=torch.Generator().manual_seed(i))
        for i, doc in enumerate(docs)
    ]
    with context():
        logits_alone, grad_alone = _alone(reference, docs, labels, weights)
        loss_alone = _reference_loss(reference, docs, labels)

    ids, positions, packed_labels = _packed(docs, labels)
    if prepare is not None:
        prepare(fast)
    seen = layer0_lengths(fast)
    fast.zero_grad()
    before = dict(shared_prefix.CALLS)
    with warnings.catch_warnings(), context():
        warnings.simplefilter("error")  # no "Position ids are not supported" warning
        out = fast(input_ids=ids, position_ids=positions, labels=packed_labels, share_prompt_prefix=share)
    assert out.logits.shape == (1, N + ids.shape[1], tiny_models.VOCAB)  # PEFT's shape, prompt first
    close = dict(atol=1e-6 * tolerance, rtol=1e-6 * tolerance)
    torch.testing.assert_close(out.loss.float(), loss_alone.float(), **close)
    offset = N
    close = dict(atol=1e-5 * tolerance, rtol=1e-5 * tolerance)
    for doc, alone in zip(docs, logits_alone, strict=True):
        torch.testing.assert_close(out.logits[0, offset : offset + len(doc)], alone[N:], **close)
        offset += len(doc)
    torch.testing.assert_close(out.logits[0, :N], logits_alone[0][:N], **close)
    # the same upstream gradient as the reference: summed CE (the loss times its count) + random weights
    count = int((packed_labels != -100).sum())
    weight = torch.cat(weights)[None]
    (out.loss * count + (out.logits[:, N:] * weight).sum()).backward()
    grad = fast.prompt_encoder["default"].embedding.weight.grad
    torch.testing.assert_close(grad, grad_alone, atol=1e-6 * tolerance, rtol=1e-5 * tolerance)
    shared = share is not False and not packed.is_varlen(implementation)
    key = "packed shared" if shared else "packed inserted"
    assert shared_prefix.CALLS[key] == before.get(key, 0) + 1
    total = ids.shape[1]
    assert seen == [N + total] if shared else seen == [len(docs) * N + total]  # the prompt once per row
    return out


@pytest.mark.parametrize("share", [None, False])
@pytest.mark.parametrize("first_label", ["trl", "real"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_llama_equals_each_document_alone(implementation, first_label, share):
    _check("llama", implementation, share, first_label)


@pytest.mark.parametrize("share", [None, False])
@pytest.mark.parametrize("family", ["gpt2", "opt", "qwen2", "gemma3"])
def test_packed_other_models_equal_each_document_alone(family, share):
    """GPT-2 and OPT (learned positions, OPT's from the mask), Qwen2 (a dict of masks), Gemma3 (sliding
    window 16, shorter than N + a document: the window is kept per position)."""
    _check(family, "eager" if family == "gemma3" else "sdpa", share, "real")


@pytest.mark.parametrize("share", [None, False])
def test_packed_sliding_window_is_kept(share):
    """Mistral with a window of 8 (< N + the longest document): each token sees only the prompt rows and
    document tokens within 8 positions, as when run alone."""
    _check("mistral", "sdpa", share, "real", config={"sliding_window": 8})


def test_packed_gemma2_eager():
    _check("gemma2", "eager", None, "real")


@pytest.mark.parametrize("reentrant", [False, True])
def test_packed_under_gradient_checkpointing(reentrant):
    def checkpointed(model):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()

    _check("llama", "sdpa", None, "real", prepare=checkpointed)


def test_packed_bf16_autocast_within_bf16_rounding():
    """Under bf16 autocast, each document alone (also under autocast) within bf16 rounding: the bf16
    tolerance (1.6e-2) is 1600x the fp32 one; the path and the first layer's lengths are checked exactly."""
    _check(
        "llama",
        "sdpa",
        None,
        "real",
        context=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        tolerance=1600,
    )


@pytest.mark.parametrize("share", [None, False])
def test_pads_of_pad_to_multiple_of_cost_no_prompt(share):
    """TRL pads a packed row with position 0 and label -100: each pad is a one-token "document" that gets
    no prompt of its own, and the documents' results are unchanged."""
    reference, fast = model_pair("llama", "CAUSAL_LM", num_virtual_tokens=N)
    docs, labels = _documents()
    ids, positions, packed_labels = _packed(docs, labels)
    pads = 5
    ids = torch.cat((ids, torch.full((1, pads), tiny_models.PAD)), dim=1)
    positions = torch.cat((positions, torch.zeros(1, pads, dtype=torch.int64)), dim=1)
    packed_labels = torch.cat((packed_labels, torch.full((1, pads), -100)), dim=1)
    seen = layer0_lengths(fast)
    out = fast(input_ids=ids, position_ids=positions, labels=packed_labels, share_prompt_prefix=share)
    torch.testing.assert_close(out.loss, _reference_loss(reference, docs, labels), atol=1e-6, rtol=1e-6)
    total = ids.shape[1]
    assert seen == [N + total] if share is None else seen == [len(docs) * N + total]


def test_data_collator_with_flattening():
    from transformers import DataCollatorWithFlattening

    reference, fast = model_pair("llama", "CAUSAL_LM", num_virtual_tokens=N)
    docs, _ = _documents()
    batch = DataCollatorWithFlattening()([{"input_ids": doc.tolist()} for doc in docs])
    assert "attention_mask" not in batch
    out = fast(**batch)
    labels = [torch.cat((torch.tensor([-100]), doc[1:])) for doc in docs]  # the collator's labels
    torch.testing.assert_close(out.loss, _reference_loss(reference, docs, labels), atol=1e-6, rtol=1e-6)


def _fake_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A CPU stand-in for flash attention's varlen kernel: causal attention within each segment that
    ``cu_seq_lens_q`` delimits over the flattened batch (it fails without them)."""
    cu = kwargs["cu_seq_lens_q"]
    assert torch.equal(cu, kwargs["cu_seq_lens_k"]) and kwargs["max_length_q"] == int(cu.diff().max())
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    flat = [t.transpose(1, 2).reshape(batch * length, -1, dim) for t in (query, key, value)]
    out = torch.empty_like(flat[0])
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        q, k, v = (t[start:end].transpose(0, 1) for t in flat)
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
        out[start:end] = attended.transpose(0, 1)
    return out.view(batch, length, heads, dim), None


def test_flash_varlen_keywords_rewritten_on_the_cpu():
    """Under flash attention (varlen kernels: each document's keys contiguous) the prompt is inserted
    before each document and ``cu_seq_lens_*`` / ``max_length_*`` / ``seq_idx`` describe the segments that
    run; a CPU stand-in of the varlen kernel, which attends only within those segments, gives each
    document's result alone. TRL's own keywords (for the rows without prompts) are replaced."""
    from transformers import AttentionInterface

    AttentionInterface.register("flash_varlen_cpu_test", _fake_varlen_attention)
    reference, fast = model_pair("llama", "CAUSAL_LM", num_virtual_tokens=N)
    fast.get_base_model().config._attn_implementation = "flash_varlen_cpu_test"
    docs, labels = _documents()
    ids, positions, packed_labels = _packed(docs, labels)
    starts = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    trl_keywords = dict(
        cu_seq_lens_q=starts, cu_seq_lens_k=starts, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS)
    )
    out = fast(input_ids=ids, position_ids=positions, labels=packed_labels, **trl_keywords)
    torch.testing.assert_close(out.loss, _reference_loss(reference, docs, labels), atol=1e-6, rtol=1e-6)
    inserted = packed.inserted_layout(packed.find_packed_rows(ids, positions, None), N)
    expected = torch.tensor(
        [0, *torch.tensor([N + n for n in LENGTHS]).cumsum(0).tolist()], dtype=torch.int32
    )
    assert torch.equal(inserted.varlen["cu_seq_lens_q"], expected)
    assert inserted.varlen["max_length_q"] == N + max(LENGTHS)
    assert inserted.varlen["seq_idx"].tolist() == [sum([[d] * (N + n) for d, n in enumerate(LENGTHS)], [])]
    with pytest.raises(ValueError, match="varlen kernels"):
        fast(input_ids=ids, position_ids=positions, labels=packed_labels, share_prompt_prefix=True)


def test_ordinary_batches_keep_peft_positions():
    """Rows with an attention mask are ordinary batches whatever position_ids say (PEFT's positions and
    PEFT's warning), left padding included."""
    reference, fast = model_pair("llama", "CAUSAL_LM", num_virtual_tokens=N)
    ids = torch.randint(4, tiny_models.VOCAB, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    outs = []
    for model in (reference, fast):
        with pytest.warns(UserWarning, match="Position ids are not supported"):
            outs.append(model(input_ids=ids, attention_mask=mask, position_ids=positions).logits)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6)


def test_bad_position_ids_are_clear_errors():
    _, fast = model_pair("llama", "CAUSAL_LM", num_virtual_tokens=N)
    ids = torch.randint(4, tiny_models.VOCAB, (2, 8))
    with pytest.raises(ValueError, match=r"position_ids has shape \(2, 7\).*expected \[2, 8\] or \[1, 8\]"):
        fast(input_ids=ids, position_ids=torch.arange(7).expand(2, 7))
    with pytest.raises(ValueError, match="integer tensor"):
        fast(input_ids=ids, position_ids=torch.zeros(2, 8))
    restarting = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with pytest.raises(ValueError, match="restart inside a row where attention_mask marks one sequence"):
        fast(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=restarting.expand(2, 8))
    out = fast(input_ids=ids, position_ids=restarting)  # [1, L] is shared by every row
    assert out.logits.shape == (2, N + 8, tiny_models.VOCAB)


def test_packed_rows_errors_where_they_cannot_be_exact():
    _, fast = model_pair("llama", "CAUSAL_LM", num_virtual_tokens=N)
    docs, labels = _documents(first_label="real")
    ids, positions, packed_labels = _packed(docs, labels)
    with pytest.raises(ValueError, match="head of this call .*'fused_lm_head'"):
        fast(input_ids=ids, position_ids=positions, labels=packed_labels, fused_lm_head=True)
    from transformers import DynamicCache

    with pytest.raises(ValueError, match=r"cannot run exact: a cache was passed in"):
        fast(input_ids=ids, position_ids=positions, past_key_values=DynamicCache())


def test_packed_rows_of_other_tasks_and_mixed_adapters_are_errors():
    _, classifier = model_pair("llama", "SEQ_CLS", num_virtual_tokens=N)
    docs, _ = _documents()
    ids, positions, _ = _packed(docs, docs)
    with pytest.raises(ValueError, match="supported for CAUSAL_LM models, not SEQ_CLS"):
        classifier(input_ids=ids, position_ids=positions)
    _, fast = model_pair("llama", "CAUSAL_LM", num_virtual_tokens=N)
    fast.add_adapter("other", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    two = torch.cat((ids, ids))
    with pytest.raises(ValueError, match="packed rows with 2 different soft prompts"):
        fast(input_ids=two, position_ids=positions, adapter_names=["default", "other"])
    out = fast(input_ids=two, position_ids=positions, adapter_names=["other", "other"])
    assert out.logits.shape == (2, N + ids.shape[1], tiny_models.VOCAB)


def test_own_loss_comes_first_as_peft_orders_it():
    """Labels on later documents' first tokens: the loss is computed per document and stands first in
    the output, as PEFT's (``return_dict=False``: ``(loss, logits)``)."""
    reference, fast = model_pair("llama", "CAUSAL_LM", num_virtual_tokens=N)
    docs, labels = _documents(first_label="real")
    ids, positions, packed_labels = _packed(docs, labels)
    out = fast(input_ids=ids, position_ids=positions, labels=packed_labels)
    assert list(out.keys())[:2] == ["loss", "logits"]
    loss, logits = fast(input_ids=ids, position_ids=positions, labels=packed_labels, return_dict=False)[:2]
    torch.testing.assert_close(loss, _reference_loss(reference, docs, labels), atol=1e-6, rtol=1e-6)
    assert logits.shape == (1, N + ids.shape[1], tiny_models.VOCAB)


def test_pads_are_found_without_a_pad_token_in_the_config():
    """Llama-family configs often name no pad token; TRL's pads (position 0, label -100, trailing) still
    cost no prompt where the prompt is inserted before each document."""
    reference, fast = model_pair("llama", "CAUSAL_LM", num_virtual_tokens=N)
    fast.get_base_model().config.pad_token_id = None
    docs, labels = _documents()
    ids, positions, packed_labels = _packed(docs, labels)
    pads = 5
    ids = torch.cat((ids, torch.full((1, pads), 7)), dim=1)
    positions = torch.cat((positions, torch.zeros(1, pads, dtype=torch.int64)), dim=1)
    packed_labels = torch.cat((packed_labels, torch.full((1, pads), -100)), dim=1)
    seen = layer0_lengths(fast)
    out = fast(input_ids=ids, position_ids=positions, labels=packed_labels, share_prompt_prefix=False)
    torch.testing.assert_close(out.loss, _reference_loss(reference, docs, labels), atol=1e-6, rtol=1e-6)
    assert seen == [len(docs) * N + ids.shape[1]]


def test_packed_rows_with_active_dropout_run_the_prompt_per_document():
    """Dropout active in training: one prompt pass would give every document one dropout mask, so the
    default inserts the prompt before each document; ``share_prompt_prefix=True`` says why not."""
    _, fast = model_pair("llama", "CAUSAL_LM", num_virtual_tokens=N)
    fast.get_base_model().config.attention_dropout = 0.1
    fast.train()
    docs, labels = _documents()
    ids, positions, packed_labels = _packed(docs, labels)
    seen = layer0_lengths(fast)
    fast(input_ids=ids, position_ids=positions, labels=packed_labels)
    assert seen == [len(docs) * N + ids.shape[1]]
    with pytest.raises(ValueError, match="active dropout in training mode"):
        fast(input_ids=ids, position_ids=positions, share_prompt_prefix=True)


def test_packed_rows_under_flex_attention_run_unpacked():
    """An attention implementation that takes no dense mask (flex attention) runs the documents unpacked,
    one per row: exact, never an error (flex attention has no backward on the CPU: evaluation here)."""
    reference, fast = model_pair("llama", "CAUSAL_LM", num_virtual_tokens=N)
    for model in (reference, fast):
        model.get_base_model().config._attn_implementation = "flex_attention"
    docs, labels = _documents()
    ids, positions, packed_labels = _packed(docs, labels)
    before = dict(shared_prefix.CALLS)
    with torch.no_grad():
        out = fast(input_ids=ids, position_ids=positions, labels=packed_labels)
    assert shared_prefix.CALLS["packed unpacked"] == before.get("packed unpacked", 0) + 1
    torch.testing.assert_close(out.loss, _reference_loss(reference, docs, labels), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="attn_implementation='flex_attention' takes no dense mask"):
        fast(input_ids=ids, position_ids=positions, share_prompt_prefix=True)
