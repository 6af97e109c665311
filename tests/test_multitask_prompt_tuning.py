"""Multitask prompt tuning (PEFT's ``MULTITASK_PROMPT_TUNING``: the table scaled per task, ``task_ids`` per
row) on fastprompt's machinery.

Reference: PEFT's own model from the same weights. Checked equal within fp32 rounding: loss, logits and
the gradients of ``embedding.weight``, ``prefix_task_cols`` and ``prefix_task_rows`` under random upstream
gradients, on the fused path (one ``prompt_concat`` over the per-task rows) and with the shared prompt
prefix (one prompt pass per distinct task of the batch); ``generate`` with ``task_ids`` (greedy, beams,
``num_return_sequences``) against decoding without a cache; the prompt-KV store keyed per task; no
``task_ids``: PEFT's error.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft_helpers import FastpromptOps, assert_same_step, uncached_greedy, with_labels

from fastprompt.testing import tiny_models

peft = pytest.importorskip("peft")
import fastprompt  # noqa: E402
from fastprompt.prompt_once import kv_store  # noqa: E402
from fastprompt.prompt_once.policy import CALLS as SHARE_CALLS  # noqa: E402

N = 6
TASKS = 4
FP32 = dict(rtol=1e-5, atol=1e-5)


def multitask_config(task: str, n: int = N):
    return peft.MultitaskPromptTuningConfig(
        task_type=task, num_virtual_tokens=n, num_tasks=TASKS, num_ranks=2
    )


def pair(family: str, task: str, n: int = N, seed: int = 0):
    base = tiny_models.build(family, task, seed=seed)
    torch.manual_seed(seed + 1)
    reference = peft.get_peft_model(copy.deepcopy(base), multitask_config(task, n))
    torch.manual_seed(seed + 2)
    fast = fastprompt.get_peft_model(copy.deepcopy(base), multitask_config(task, n))
    fast.load_state_dict(reference.state_dict())
    return reference.eval(), fast.eval()


def _inputs(task: str, task_ids, seq: int = 6) -> dict:
    inputs = with_labels(tiny_models.batch(len(task_ids), seq), task)
    inputs["task_ids"] = torch.tensor(task_ids)
    return inputs


def _trainable_names(model) -> set:
    return {name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "family,task",
    [("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("bert", "SEQ_CLS")],
)
def test_fused_forward_backward_equal_peft(family, task):
    """One fused concat over the per-task rows; Seq2Seq's forward stays PEFT's (it puts task rows before
    the decoder inputs too)."""
    reference, fast = pair(family, task)
    kwargs = {} if task == "SEQ_2_SEQ_LM" else dict(share_prompt_prefix=False)
    assert {"weight", "prefix_task_cols", "prefix_task_rows"} <= _trainable_names(reference)
    with FastpromptOps() as ops:
        assert_same_step(reference, fast, _inputs(task, [2, 0, 2, 3]), **kwargs)
    assert ops.forward == (0 if task == "SEQ_2_SEQ_LM" else 1)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_shared_prefix_one_pass_per_distinct_task(family):
    reference, fast = pair(family, "CAUSAL_LM", n=16)
    inputs = _inputs("CAUSAL_LM", [1, 3, 1, 1, 3, 0])
    before = SHARE_CALLS["shared"]
    prompt_passes = []
    base = fast.get_base_model()
    hook = base.register_forward_pre_hook(
        lambda module, args, kwargs: prompt_passes.append(kwargs["inputs_embeds"].shape[:2]), with_kwargs=True
    )
    try:
        assert_same_step(reference, fast, inputs, share_prompt_prefix=True)
    finally:
        hook.remove()
    assert SHARE_CALLS["shared"] == before + 1
    assert prompt_passes[0] == (3, 16)  # the prompt pass: one row per distinct task


def test_task_ids_required_and_checked():
    reference, fast = pair("llama", "CAUSAL_LM")
    inputs = _inputs("CAUSAL_LM", [0, 1, 2])
    inputs.pop("task_ids")
    with pytest.raises(ValueError, match="task_ids cannot be None"):
        reference(**inputs)
    with pytest.raises(ValueError, match="task_ids cannot be None"):
        fast(**inputs)
    with pytest.raises(ValueError, match="task_ids cannot be None"):
        fast.generate(input_ids=inputs["input_ids"], max_new_tokens=2)
    with pytest.raises(ValueError, match="one task per batch row"):
        fast(**inputs, task_ids=torch.tensor([0, 1]))
    # out of range: PEFT's index_select IndexError on the CPU (a device-side assert on a GPU); here a
    # clear error before anything runs, an IndexError too
    for bad in ([0, 4, 1], [0, -1, 1]):
        with pytest.raises(IndexError, match=r"task_ids\[1\] is -?\d, but adapter 'default' has num_tasks=4"):
            fast(**inputs, task_ids=torch.tensor(bad))
        with pytest.raises(ValueError, match="task ids 0..3 are expected"):
            fast.generate(input_ids=inputs["input_ids"], task_ids=torch.tensor(bad), max_new_tokens=2)
    with pytest.raises(IndexError):
        reference(**inputs, task_ids=torch.tensor([0, 4, 1]))
    # one entry stands for every row, as PEFT's broadcast
    torch.testing.assert_close(
        fast(**inputs, task_ids=torch.tensor([2])).logits,
        reference(**inputs, task_ids=torch.tensor([2])).logits,
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_task_ids(family):
    reference, fast = pair(family, "CAUSAL_LM")
    ids = tiny_models.batch(3, 4, left_pad=False)["input_ids"]
    task_ids = torch.tensor([3, 1, 3])
    expected = uncached_greedy(reference, ids, 5, task_ids)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tiny_models.PAD)
    store = kv_store.prompt_kv_store(fast)
    store.clear()
    for reuse in (True, False):
        got = fast.generate(input_ids=ids, task_ids=task_ids, reuse_prompt_kv=reuse, **kwargs)
        assert torch.equal(got, expected), (reuse, got, expected)
    assert sorted(store.names()) == [("default", 1), ("default", 3)]
    beams = dict(num_beams=3, num_return_sequences=2, **kwargs)
    with_reuse = fast.generate(input_ids=ids, task_ids=task_ids, **beams)
    without = fast.generate(input_ids=ids, task_ids=task_ids, reuse_prompt_kv=False, **beams)
    assert torch.equal(with_reuse, without)
    # each returned sequence is its row's: equal to that row generated alone with its task
    for row in range(3):
        alone = fast.generate(input_ids=ids[row : row + 1], task_ids=task_ids[row : row + 1], **beams)
        assert torch.equal(with_reuse[2 * row : 2 * row + 2], alone)


def test_seq2seq_generate_with_task_ids():
    reference, fast = pair("t5", "SEQ_2_SEQ_LM")
    ids = tiny_models.batch(2, 5, left_pad=False)["input_ids"]
    task_ids = torch.tensor([0, 2])
    kwargs = dict(max_new_tokens=4, do_sample=False)
    expected = reference.generate(input_ids=ids, task_ids=task_ids, **kwargs)
    with FastpromptOps() as ops:
        got = fast.generate(input_ids=ids, task_ids=task_ids, **kwargs)
    assert torch.equal(got, expected)
    assert ops.forward == 1


def test_prompt_kv_per_task_never_stale():
    """An optimizer step on one task's factors changes that task's rows: recomputed, the other kept."""
    _, fast = pair("llama", "CAUSAL_LM")
    ids = tiny_models.batch(2, 4, left_pad=False)["input_ids"]
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tiny_models.PAD)
    task_ids = torch.tensor([0, 1])
    fast.generate(input_ids=ids, task_ids=task_ids, **kwargs)
    computed = kv_store.CALLS["computed"]
    with torch.no_grad():
        fast.prompt_encoder["default"].prefix_task_rows[1] += 0.5
    after = fast.generate(input_ids=ids, task_ids=task_ids, **kwargs)
    assert kv_store.CALLS["computed"] == computed + 1  # task 1 only
    assert torch.equal(
        after, fast.generate(input_ids=ids, task_ids=task_ids, reuse_prompt_kv=False, **kwargs)
    )


def test_mixed_multitask_adapters():
    """adapter_names with task_ids: each (adapter, task) of the batch is one prompt; every row equals its
    adapter run alone with its task."""
    _, fast = pair("llama", "CAUSAL_LM")
    torch.manual_seed(5)
    fast.add_adapter("other", multitask_config("CAUSAL_LM"))
    fast.eval()
    inputs = _inputs("CAUSAL_LM", [0, 2, 2, 1])
    names = ["other", "default", "other", "default"]
    for share in (False, True):
        mixed = fast(**inputs, adapter_names=names, share_prompt_prefix=share)
        for name in ("default", "other"):
            rows = [i for i, row_name in enumerate(names) if row_name == name]
            fast.set_adapter(name)
            alone = fast(**{k: v[rows] for k, v in inputs.items()}, share_prompt_prefix=False)
            torch.testing.assert_close(mixed.logits[rows], alone.logits, **FP32)
        fast.set_adapter("default")
