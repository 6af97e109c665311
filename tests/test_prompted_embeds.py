"""The module layer's fused operation: ``PromptEmbedding.prepend`` and ``prompted_inputs_embeds``.

Every result is compared with the modules called the PEFT way (word-embedding module, prompt rows, cast,
``torch.cat``), forward and gradients into each table, with NaN-poisoned outputs, on both backends.
"""

from __future__ import annotations

import pytest
import torch
from peft_helpers import FastpromptOps

from fastprompt import PromptEmbedding, PromptTuningConfig
from fastprompt.prompted_embeds import CALLS, prompted_inputs_embeds
from fastprompt.testing import tiny_models
from fastprompt.testing.reference import poisoned_empty


def _word_embeddings(kind: str) -> torch.nn.Module:
    if kind == "plain":
        torch.manual_seed(0)
        return torch.nn.Embedding(tiny_models.VOCAB, tiny_models.HIDDEN, padding_idx=0)
    if kind == "gemma3_bf16":
        return tiny_models.build("gemma3", "CAUSAL_LM", dtype=torch.bfloat16).get_input_embeddings()
    return tiny_models.build("bart", "SEQ_2_SEQ_LM").get_input_embeddings()  # scale_embedding=True


def _prompt(num_rows: int, seed: int) -> PromptEmbedding:
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_rows,
        token_dim=tiny_models.HIDDEN,
        num_transformer_submodules=1,
    )
    torch.manual_seed(seed)
    return PromptEmbedding(config, None)


def _reference(input_ids, word_embeddings, prompts, table_index, num_prompt):
    """PEFT's steps, per batch row: the module called, the row's prompt rows cast, then concatenated."""
    tokens = word_embeddings(input_ids)
    rows = [prompts[k].embedding.weight[:num_prompt] for k in table_index]
    return torch.cat((torch.stack(rows).to(tokens.dtype), tokens), dim=1)


def _ids(batch=4, seq_len=5, seed=0):
    ids = torch.randint(1, tiny_models.VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    ids[-1, :2] = 0  # left padding: the padding row gets no gradient
    return ids


@pytest.mark.parametrize("kind", ["plain", "gemma3_bf16", "bart"])
def test_prepend_equals_peft_steps(backend, kind):
    word_embeddings = _word_embeddings(kind)
    word_embeddings.weight.requires_grad_(True)
    prompt = _prompt(3, seed=1)
    ids = _ids()
    with poisoned_empty(), FastpromptOps() as ops:
        out = prompt.prepend(ids, word_embeddings)
    assert ops.forward == 1
    expected = _reference(ids, word_embeddings, [prompt], [0] * 4, 3)
    assert out.dtype == expected.dtype
    if backend == "triton" and out.dtype == torch.bfloat16:
        # the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest): 1 bf16 ulp (DESIGN.md)
        torch.testing.assert_close(out, expected, atol=0, rtol=2**-7)
    else:
        assert torch.equal(out, expected)

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    got = torch.autograd.grad(out, [prompt.embedding.weight, word_embeddings.weight], grad)
    want = torch.autograd.grad(expected, [prompt.embedding.weight, word_embeddings.weight], grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("as_list", [False, True])
def test_several_tables_one_call(backend, as_list):
    """K tables in one batch: each row equals its own table's rows; each table gets only its rows' grads."""
    word_embeddings = _word_embeddings("plain")
    prompts = [_prompt(4, seed=s) for s in (1, 2, 3)]
    table_index = [2, 0, 2, 1, 0]
    ids = _ids(batch=5)
    index = table_index if as_list else torch.tensor(table_index)
    with poisoned_empty(), FastpromptOps() as ops:
        out = prompted_inputs_embeds(ids, word_embeddings, prompts, index, num_prompt=3)
    assert ops.forward == 1  # one fused call, whatever the number of tables
    expected = _reference(ids, word_embeddings, prompts, table_index, 3)
    assert torch.equal(out, expected)

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    weights = [p.embedding.weight for p in prompts]
    got = torch.autograd.grad(out, weights, grad)
    # an independent float64 reference: row b's prompt part adds into table table_index[b]
    for k, g in enumerate(got):
        want = torch.zeros(4, tiny_models.HIDDEN, dtype=torch.float64)
        for b, kb in enumerate(table_index):
            if kb == k:
                want[:3] += grad[b, :3].double()
        torch.testing.assert_close(g.double(), want, atol=1e-6, rtol=1e-6)


def test_several_tables_module_unfused_path_agrees():
    """A word-embedding module with a hook is called (unfused): same rows, the hook fires."""
    word_embeddings = _word_embeddings("plain")
    calls = []
    word_embeddings.register_forward_pre_hook(lambda module, args: calls.append(1))
    prompts = [_prompt(3, seed=s) for s in (1, 2)]
    ids = _ids(batch=3)
    before = CALLS["unfused"]
    with FastpromptOps() as ops:
        out = prompted_inputs_embeds(ids, word_embeddings, prompts, [1, 0, 1])
    assert ops.forward == 0 and CALLS["unfused"] == before + 1 and calls
    calls.clear()
    assert torch.equal(out, _reference(ids, word_embeddings, prompts, [1, 0, 1], 3))


def _register(kind: str, module: torch.nn.Module, fired: list):
    if kind == "forward_pre":
        return module.register_forward_pre_hook(lambda m, args: fired.append(kind))
    if kind == "forward":
        return module.register_forward_hook(lambda m, args, out: fired.append(kind))
    if kind == "forward_kwargs":
        return module.register_forward_hook(lambda m, args, kwargs, out: fired.append(kind), with_kwargs=True)
    if kind == "backward":
        return module.register_full_backward_hook(lambda m, gin, gout: fired.append(kind))
    if kind == "backward_pre":
        return module.register_full_backward_pre_hook(lambda m, gout: fired.append(kind))
    from torch.nn.modules import module as module_globals

    register = {
        "global_forward": module_globals.register_module_forward_hook,
        "global_forward_pre": module_globals.register_module_forward_pre_hook,
        "global_backward": module_globals.register_module_full_backward_hook,
    }[kind]
    if kind == "global_forward":
        return register(lambda m, args, out: fired.append(kind) if m is module else None)
    if kind == "global_forward_pre":
        return register(lambda m, args: fired.append(kind) if m is module else None)
    return register(lambda m, gin, gout: fired.append(kind) if m is module else None)


HOOKS = [
    "forward_pre",
    "forward",
    "forward_kwargs",
    "backward",
    "backward_pre",
    "global_forward",
    "global_forward_pre",
    "global_backward",
]


@pytest.mark.parametrize("kind", HOOKS)
def test_hooked_word_embeddings_are_called_and_hooks_fire(kind):
    word_embeddings = _word_embeddings("plain")
    word_embeddings.weight.requires_grad_(True)
    prompt = _prompt(2, seed=1)
    fired: list = []
    handle = _register(kind, word_embeddings, fired)
    try:
        with FastpromptOps() as ops:
            out = prompt.prepend(_ids(), word_embeddings)
        out.backward(torch.randn(out.shape))
    finally:
        handle.remove()
    assert ops.forward == 0, "a hooked module must be called, not fused"
    assert kind in fired


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_hooked_prompt_module_is_called(kind):
    word_embeddings = _word_embeddings("plain")
    prompt = _prompt(2, seed=1)
    fired: list = []
    handle = _register(kind, prompt, fired)
    with FastpromptOps() as ops:
        out = prompt.prepend(_ids(), word_embeddings)
    out.backward(torch.randn(out.shape))
    handle.remove()
    assert ops.forward == 0 and kind in fired


def test_num_prompt_takes_first_rows():
    word_embeddings = _word_embeddings("plain")
    prompt = _prompt(6, seed=1)  # a seq2seq table: 2N rows, the encoder takes N
    ids = _ids()
    out = prompt.prepend(ids, word_embeddings, num_prompt=3)
    assert torch.equal(out, _reference(ids, word_embeddings, [prompt], [0] * 4, 3))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda w, p, ids: prompted_inputs_embeds(ids, w, [p, p]), ValueError, "table_index"),
        (lambda w, p, ids: prompted_inputs_embeds(ids, w, [p, p], [0, 1]), ValueError, "B=4"),
        (lambda w, p, ids: prompted_inputs_embeds(ids, w, [p, p], [0, 2, 0, 0]), ValueError, r"\[0, 2\)"),
        (
            lambda w, p, ids: prompted_inputs_embeds(ids, w, [p], torch.zeros(4, 1, dtype=torch.long)),
            ValueError,
            "1-D",
        ),
        (lambda w, p, ids: prompted_inputs_embeds(ids, w, [p], num_prompt=9), ValueError, "num_prompt"),
        (lambda w, p, ids: prompted_inputs_embeds(ids, w, []), TypeError, "prompt_embeddings"),
        (lambda w, p, ids: prompted_inputs_embeds(ids, w, "default"), TypeError, "prompt_embeddings"),
        (lambda w, p, ids: p.prepend(ids.float(), w), TypeError, "input_ids"),
        (lambda w, p, ids: p.prepend(ids[0], w), ValueError, "input_ids"),
        (lambda w, p, ids: p.prepend(ids[None], w), ValueError, "input_ids"),
    ],
)
def test_bad_arguments_are_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(_word_embeddings("plain"), _prompt(3, seed=1), _ids())


def test_forward_stays_peft_s():
    prompt = _prompt(3, seed=1)
    indices = torch.tensor([[2, 0, 1]])
    assert torch.equal(prompt(indices), prompt.embedding.weight[indices])
