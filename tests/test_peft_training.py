"""Training through the fused op: HF Trainer (same steps as PEFT), gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from peft_helpers import FastpromptOps, model_pair, train

from fastprompt.testing import tiny_models

peft = pytest.importorskip("peft")


def test_trainer_trains_like_peft(tmp_path):
    reference, fast = model_pair("llama", "CAUSAL_LM")
    before = fast.prompt_encoder["default"].embedding.weight.detach().clone()
    losses_ref = train(reference, tmp_path / "peft")
    with FastpromptOps() as ops:
        losses_fast = train(fast, tmp_path / "fast")
    assert ops.forward == 3 and any(name.startswith("prompt_concat_prompt_grad") for name in ops.names)
    weight = fast.prompt_encoder["default"].embedding.weight
    assert not torch.equal(weight, before)  # it trained
    torch.testing.assert_close(
        weight, reference.prompt_encoder["default"].embedding.weight, atol=1e-5, rtol=1e-5
    )
    assert losses_fast == pytest.approx(losses_ref, rel=1e-5)
    # only the prompt is trainable
    assert [n for n, p in fast.named_parameters() if p.requires_grad] == [
        "prompt_encoder.default.embedding.weight"
    ]


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradient_checkpointing(family, use_reentrant):
    reference, fast = model_pair(family, "CAUSAL_LM")
    inputs = tiny_models.batch()
    grads = []
    for model in (reference, fast):
        model.train()
        model.prepare_model_for_gradient_checkpointing(model)
        model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
        with FastpromptOps() as ops:
            (model(**inputs).logits ** 2).sum().backward()
        grads.append(model.prompt_encoder["default"].embedding.weight.grad)
    assert ops.forward == 1
    assert grads[1] is not None and torch.count_nonzero(grads[1]) > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)
