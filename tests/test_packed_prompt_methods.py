"""Packed / padding-free rows (beyond PEFT) with P-tuning and multitask prompt tuning: each document gets the
encoder's rows (or its task's rows) at positions 0..N-1 and its tokens after them, exactly as the document
run alone through PEFT. Checked: the loss, every document's logits, and the gradient of every trainable
parameter of the prompt module (the table, the MLP / LSTM weights; the task factors) under the loss plus
random weights on the logits, on both layouts (the shared prompt, once per packed row; the prompt inserted
before each document), with the encoder run once per forward. A packed batch of several tasks is a clear
error: it takes one task.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft_helpers import layer0_lengths

from fastprompt.prompt_once import policy as shared_prefix
from fastprompt.testing import tiny_models

peft = pytest.importorskip("peft")
import fastprompt  # noqa: E402

N = 5
LENGTHS = (7, 12, 5)
TASK = 2


def _config(method: str):
    if method == "multitask":
        return peft.MultitaskPromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N, num_tasks=3, num_ranks=2
        )
    encoder = "LSTM" if method == "ptuning_lstm" else "MLP"
    return peft.PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=N,
        encoder_hidden_size=16,
        encoder_reparameterization_type=encoder,
    )


def _pair(method: str, family: str):
    """(PEFT model, fastprompt model), the same base and prompt-module weights, in train mode (the tiny
    models' dropouts are 0)."""
    base = tiny_models.build(family, "CAUSAL_LM")
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(base), _config(method))
    torch.manual_seed(2)
    fast = fastprompt.get_peft_model(copy.deepcopy(base), _config(method))
    fast.load_state_dict(reference.state_dict())
    return reference.train(), fast.train()


def _prompt_grads(model) -> dict:
    return {name: p.grad.clone() for name, p in model.prompt_encoder["default"].named_parameters()}


def _documents():
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(4, tiny_models.VOCAB, (length,), generator=generator) for length in LENGTHS]
    labels = [doc.clone() for doc in docs]
    for label in labels:
        label[0] = -100  # TRL's labels: no document's first token is predicted
    return docs, labels


@pytest.mark.parametrize("share", [None, False])
@pytest.mark.parametrize(
    "method,family",
    [("ptuning", "llama"), ("ptuning_lstm", "gpt2"), ("ptuning", "opt"), ("multitask", "llama")],
)
def test_packed_row_equals_each_document_alone(method, family, share):
    reference, fast = _pair(method, family)
    extra = {"task_ids": torch.tensor([TASK])} if method == "multitask" else {}
    docs, labels = _documents()
    weights = [
        torch.randn(len(d), tiny_models.VOCAB, generator=torch.Generator().manual_seed(i))
        for i, d in enumerate(docs)
    ]

    # each document alone through PEFT: the summed CE and the weighted logits, one backward
    total, summed_ce, count, alone = 0.0, 0.0, 0, []
    for doc, label, weight in zip(docs, labels, weights, strict=True):
        out = reference(input_ids=doc[None], labels=label[None], **extra)
        k = int((label != -100).sum())
        total = total + out.loss * k + (out.logits[0, N:] * weight).sum()
        count += k
        summed_ce = summed_ce + out.loss.detach() * k
        alone.append(out.logits[0].detach())
    total.backward()
    expected_grads = _prompt_grads(reference)
    expected_loss = summed_ce / count

    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(doc)) for doc in docs])[None]
    seen = layer0_lengths(fast)
    encoder_calls = []
    fast.prompt_encoder["default"].register_forward_hook(lambda *args: encoder_calls.append(1))
    before = dict(shared_prefix.CALLS)
    out = fast(
        input_ids=ids,
        position_ids=positions,
        labels=torch.cat(labels)[None],
        share_prompt_prefix=share,
        **extra,
    )
    key = "packed inserted" if share is False else "packed shared"
    assert shared_prefix.CALLS[key] == before.get(key, 0) + 1
    # the shared layout: PEFT's [1, N + T] row, the prompt once; inserted: the prompt before each document
    assert seen == ([N + ids.shape[1]] if share is None else [len(LENGTHS) * N + ids.shape[1]])
    assert out.logits.shape == (1, N + ids.shape[1], tiny_models.VOCAB)
    assert len(encoder_calls) == 1  # the encoder (or the task scaling) once per forward
    torch.testing.assert_close(out.loss, expected_loss, atol=1e-5, rtol=1e-5)
    offset = N
    for doc, logits in zip(docs, alone, strict=True):
        torch.testing.assert_close(
            out.logits[0, offset : offset + len(doc)], logits[N:], atol=1e-5, rtol=1e-5
        )
        offset += len(doc)
    torch.testing.assert_close(out.logits[0, :N], alone[0][:N], atol=1e-5, rtol=1e-5)
    (out.loss * count + (out.logits[0, N:] * torch.cat(weights)).sum()).backward()
    got_grads = _prompt_grads(fast)
    assert got_grads.keys() == expected_grads.keys() and len(got_grads) > 1
    for name, grad in expected_grads.items():
        scale = max(1.0, grad.abs().max().item())
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5 * scale, rtol=1e-5, msg=name)


def test_packed_batch_of_several_tasks_is_a_clear_error():
    """Two packed rows of tasks 0 and 1: a packed batch takes one task."""
    _, fast = _pair("multitask", "llama")
    docs, labels = _documents()
    ids = torch.stack([torch.cat(docs), torch.cat(docs)])
    positions = torch.cat([torch.arange(len(doc)) for doc in docs])[None].expand(2, -1)
    with pytest.raises(
        ValueError, match=r"task_ids of 2 different tasks \[0, 1\] in one batch: a packed batch"
    ):
        fast(input_ids=ids, position_ids=positions, task_ids=torch.tensor([0, 1]))
