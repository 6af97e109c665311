"""Bad input at the model level: a clear error naming the argument, for every task type (forward) and for
Seq2Seq ``generate``; valid edge cases (int32 ids, no tokens at all, only virtual ones) still equal PEFT."""

from __future__ import annotations

import pytest
import torch
from peft_helpers import FastpromptOps, main_output, model_pair

from fastprompt.integrations import check_prompt_inputs
from fastprompt.testing import tiny_models

peft = pytest.importorskip("peft")

TASKS = [
    ("gpt2", "CAUSAL_LM"),
    ("t5", "SEQ_2_SEQ_LM"),
    ("bert", "SEQ_CLS"),
    ("roberta", "TOKEN_CLS"),
    ("llama", "QUESTION_ANS"),
    ("opt", "FEATURE_EXTRACTION"),
]

IDS = tiny_models.batch()["input_ids"]  # [3, 6]
MASK = tiny_models.batch()["attention_mask"]

# (input_ids, attention_mask, exception, pattern): each names the argument, what it got, what is expected
BAD_INPUTS = {
    "float ids": (IDS.float(), MASK, TypeError, r"input_ids must be a tensor of token ids .*torch\.float32"),
    "bool ids": (IDS.bool(), MASK, TypeError, r"input_ids .*torch\.int64 or torch\.int32.*torch\.bool"),
    "list ids": (IDS.tolist(), None, TypeError, r"input_ids must be a tensor .*got list"),
    "1-D ids": (IDS[0], MASK[0], ValueError, r"input_ids must be 2-D, \[batch, seq_len\]; got a 1-D.*\(6,\)"),
    "3-D ids": (IDS[None], MASK[None], ValueError, r"input_ids must be 2-D.* got a 3-D .*\(1, 3, 6\)"),
    "empty batch": (IDS[:0], MASK[:0], ValueError, r"input_ids has an empty batch \(shape \(0, 6\)\)"),
    "longer mask": (
        IDS,
        torch.ones(3, 7, dtype=torch.long),
        ValueError,
        r"input_ids has shape \(3, 6\), attention_mask has shape \(3, 7\)",
    ),
    "shorter mask": (IDS, MASK[:, 1:], ValueError, r"input_ids has shape \(3, 6\), attention_mask.*\(3, 5\)"),
    "mask of other batch": (IDS, MASK[:2], ValueError, r"attention_mask has shape \(2, 6\)"),
    "1-D mask": (IDS, MASK[0], ValueError, r"attention_mask has shape \(6,\)"),
    "list mask": (IDS, MASK.tolist(), TypeError, r"attention_mask must be None or a tensor .*got list"),
}


@pytest.fixture(scope="module")
def models():
    """(family, task) -> fastprompt model (built once for the module)."""
    return {(family, task): model_pair(family, task)[1] for family, task in TASKS}


def _call(model, task: str, input_ids, attention_mask):
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if task == "SEQ_2_SEQ_LM":
        batch_size = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else 3
        kwargs["decoder_input_ids"] = torch.ones(batch_size, 2, dtype=torch.long)
    return model(**kwargs)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("family, task", TASKS)
def test_bad_forward_input_gives_a_clear_error(models, family, task, case):
    input_ids, attention_mask, error, pattern = BAD_INPUTS[case]
    with FastpromptOps() as ops:
        with pytest.raises(error, match=pattern):
            _call(models[family, task], task, input_ids, attention_mask)
    assert ops.names == []  # refused before anything ran


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_seq2seq_generate_input_gives_a_clear_error(models, case):
    input_ids, attention_mask, error, pattern = BAD_INPUTS[case]
    with pytest.raises(error, match=pattern):
        models["t5", "SEQ_2_SEQ_LM"].generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2
        )


def test_checks_are_exported_for_other_wrappers():
    check_prompt_inputs(IDS, MASK)
    check_prompt_inputs(IDS.int(), None)
    with pytest.raises(ValueError, match="attention_mask"):
        check_prompt_inputs(IDS, MASK[:, :2])


@pytest.mark.parametrize(
    "input_ids, attention_mask",
    [
        pytest.param(IDS.int(), MASK, id="int32 ids"),
        pytest.param(IDS, MASK.bool(), id="bool mask"),
        pytest.param(IDS[:, :0], MASK[:, :0], id="no tokens"),
        pytest.param(IDS[:1], None, id="one row, no mask"),
    ],
)
@pytest.mark.parametrize("family, task", TASKS)
def test_valid_edge_inputs_still_equal_peft(family, task, input_ids, attention_mask):
    reference, fast = model_pair(family, task)
    with FastpromptOps() as ops:
        got = main_output(_call(fast, task, input_ids, attention_mask))
    assert ops.forward == 1
    expected = main_output(_call(reference, task, input_ids, attention_mask))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("reuse", [None, False])
def test_causal_lm_generate_checks_inputs(reuse):
    """CausalLM generate (with or without prompt-KV reuse) gives the same clear errors as forward."""
    import fastprompt

    model = fastprompt.get_peft_model(
        tiny_models.build("llama", "CAUSAL_LM"),
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    ).eval()
    ids = tiny_models.batch()["input_ids"]
    settings = dict(max_new_tokens=2, do_sample=False, pad_token_id=0, reuse_prompt_kv=reuse)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(
            input_ids=ids, attention_mask=torch.ones(ids.shape[0], 2, dtype=torch.long), **settings
        )
    with pytest.raises(TypeError, match="input_ids"):
        model.generate(input_ids=ids.float(), **settings)
    with pytest.raises(TypeError, match="input_ids"):
        model.generate(ids.float(), **settings)
