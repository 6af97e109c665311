"""The router's auxiliary loss when the prompt runs once (``share_prompt_prefix``).

PEFT's path hands a MoE model's load-balancing loss the router logits of every row's N virtual tokens and
L tokens; the shared forward gives the family's own function the same logits (the prompt's, of each row's
adapter, then the tokens'), so loss, ``aux_loss``, ``router_logits`` and every gradient equal PEFT's.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastprompt.prompt_once import policy, router_loss
from fastprompt.testing import model_matrix

pytest.importorskip("peft")
pytest.importorskip("transformers")


def _pair(model_type: str, via: str):
    reference, fast = model_matrix._pair(model_type, "CAUSAL_LM", model_matrix.N)
    if via == "config":
        for model in (reference, fast):
            model.get_base_model().config.output_router_logits = True
    return reference, fast


def _run(model, ids, mask, labels, extra):
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    weights = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(3))
    (out.loss + (out.logits.float() * weights).sum() * 1e-3).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("via", ["config", "kwarg"])
def test_router_aux_loss_shared_equals_peft(model_type, via):
    reference, fast = _pair(model_type, via)
    ids, mask, labels = model_matrix._batch()
    extra = {"output_router_logits": True} if via == "kwarg" else {}
    expected, expected_grads = _run(reference, ids, mask, labels, extra)
    before = policy.CALLS["shared"]
    got, grads = _run(fast, ids, mask, labels, {**extra, "share_prompt_prefix": True})
    assert policy.CALLS["shared"] == before + 1  # the prompt ran once
    assert expected.aux_loss is not None and float(expected.aux_loss.detach()) > 0
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=1e-5)
    assert len(got.router_logits) == len(expected.router_logits)
    for a, b in zip(got.router_logits, expected.router_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_router_aux_loss_mixed_adapters_equal_each_alone():
    """Two adapters in one batch (``adapter_names``): each row's prompt router logits are its adapter's."""
    import peft

    reference, fast = _pair("mixtral", "config")
    config = copy.deepcopy(fast.peft_config["default"])
    fast.add_adapter("other", config)
    reference.add_adapter("other", copy.deepcopy(config))
    with torch.no_grad():
        fast.prompt_encoder["other"].embedding.weight.normal_()
    reference.load_state_dict(fast.state_dict())
    ids, mask, labels = model_matrix._batch()
    names = ["default", "other", "other", "default"]
    before = policy.CALLS["shared"]
    got = fast(
        input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names, share_prompt_prefix=True
    )
    assert policy.CALLS["shared"] == before + 1
    unshared = fast(
        input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names, share_prompt_prefix=False
    )
    torch.testing.assert_close(got.aux_loss, unshared.aux_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.loss, unshared.loss, atol=1e-6, rtol=1e-5)
    assert isinstance(reference, peft.PeftModel)


def test_router_logits_at_the_decoder_decline_with_the_reason():
    """A head of its own (the prompt shared at the decoder) would count the prompt's router logits once."""
    _, fast = _pair("mixtral", "config")
    base = fast.get_base_model()
    assert policy.router_loss_reason(base, {}, at_decoder=True).startswith("output_router_logits=True")
    assert policy.router_loss_reason(base, {}, at_decoder=False) is None  # decided at run time
    assert policy.router_loss_reason(base, {"output_router_logits": False}, at_decoder=True) is None


@pytest.mark.parametrize("model_type", ["glm4_moe", "deepseek_v3"])
def test_router_logits_without_an_aux_loss_share_and_equal_peft(model_type):
    """Families that return router logits but compute no auxiliary loss: the shared forward joins the
    prompt's router logits (per row) with the tokens' after the token pass."""
    reference, fast = _pair(model_type, "config")
    ids, mask, labels = model_matrix._batch()
    expected, expected_grads = _run(reference, ids, mask, labels, {})
    before = policy.CALLS["shared"]
    got, grads = _run(fast, ids, mask, labels, {"share_prompt_prefix": True})
    assert policy.CALLS["shared"] == before + 1
    assert getattr(expected, "aux_loss", None) is None and getattr(got, "aux_loss", None) is None
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=1e-5)
    for a, b in zip(got.router_logits, expected.router_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_an_aux_loss_computed_another_way_declines(monkeypatch):
    """A model whose auxiliary loss comes from a function that cannot be found (here Mixtral's, behind a
    parameter name that does not say logits) would count the prompt once: found after the token pass, it
    declines (``share_prompt_prefix=True`` raises) and the default takes PEFT's path, exact."""
    from transformers.models.mixtral import modeling_mixtral

    original = modeling_mixtral.load_balancing_loss_func

    def hidden_aux(values, *args, **kwargs):
        return original(values, *args, **kwargs)

    monkeypatch.setattr(modeling_mixtral, "load_balancing_loss_func", hidden_aux)
    reference, fast = _pair("mixtral", "config")
    assert router_loss.aux_loss_functions(fast.get_base_model()) == []
    ids, mask, labels = model_matrix._batch()
    with pytest.raises(ValueError, match="auxiliary loss"):
        fast(input_ids=ids, attention_mask=mask, labels=labels, share_prompt_prefix=True)
    expected, _ = _run(reference, ids, mask, labels, {})
    got, _ = _run(fast, ids, mask, labels, {})
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=1e-5)


def test_join_orders_prompt_then_tokens_per_row():
    prompt = (torch.arange(2 * 3 * 1.0).reshape(2 * 3, 1),)  # K=2 prompts of N=3 positions, E=1
    tokens = (torch.full((4 * 2, 1), -1.0),)  # B=4 rows of L=2
    index = torch.tensor([1, 0, 0, 1])
    (joined,) = router_loss.join(prompt, tokens, index, batch=4, n=3)
    rows = joined.reshape(4, 5)
    assert rows[0].tolist() == [3, 4, 5, -1, -1]
    assert rows[1].tolist() == [0, 1, 2, -1, -1]
    assert router_loss.join(prompt, tokens + tokens, index, batch=4, n=3) is None  # layers do not match
