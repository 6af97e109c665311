"""``fastprompt.deepspeed_zero3`` in one process, without DeepSpeed: which tables count as ZeRO-3 ones,
and the fallback where no ZeRO-3 engine put its hooks on the modules (the 2-process runs with DeepSpeed
itself are in test_distributed.py)."""

from __future__ import annotations

import torch

from fastprompt.prompted_embeds import CALLS, deepspeed_zero3, prompted_inputs_embeds
from fastprompt.prompted_embeds.word_embeddings import full_shape


class _Prompt(torch.nn.Module):
    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(rows, dim)

    def forward(self, indices):
        return self.embedding(indices)


def _mark_zero3(param: torch.nn.Parameter) -> None:
    """The attributes DeepSpeed puts on a ZeRO-3 parameter (here left whole: not partitioned)."""
    param.ds_id, param.ds_shape, param.ds_status = 0, param.shape, "AVAILABLE"


def test_zero3_detection_and_full_shape():
    word, prompt = torch.nn.Embedding(11, 4), _Prompt(3, 4)
    assert not deepspeed_zero3.is_zero3(word, [prompt])
    _mark_zero3(prompt.embedding.weight)
    assert deepspeed_zero3.is_zero3(word, [prompt])
    shard = torch.nn.Parameter(torch.empty(0))
    shard.ds_id, shard.ds_shape = 1, torch.Size([11, 4])
    assert deepspeed_zero3.is_zero3_param(shard) and full_shape(shard) == (11, 4)
    assert full_shape(word.weight) == (11, 4)
    assert not deepspeed_zero3.is_zero3_hook(lambda module, args: None)


def test_zero3_tables_outside_an_engine_take_the_module_path():
    """ZeRO-3 parameters on modules without ZeRO-3's hooks (e.g. built under zero.Init, used before
    deepspeed.initialize): nothing would gather them, so the modules are called, as PEFT does."""
    torch.manual_seed(0)
    word, prompt = torch.nn.Embedding(11, 4), _Prompt(3, 4)
    _mark_zero3(word.weight)
    _mark_zero3(prompt.embedding.weight)
    ids = torch.randint(0, 11, (2, 5))
    before = CALLS["unfused"]
    out = prompted_inputs_embeds(ids, word, prompt)
    assert CALLS["unfused"] == before + 1
    expected = torch.cat((prompt.embedding.weight.expand(2, -1, -1), word(ids)), dim=1)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    grad = torch.randn(out.shape)
    out.backward(grad)
    torch.testing.assert_close(prompt.embedding.weight.grad, grad[:, :3].sum(0))


def test_encoder_rows_with_a_zero3_word_table_outside_an_engine():
    """P-tuning's / multitask's rows (an encoder's output) with a ZeRO-3 word table on a module without
    ZeRO-3's hooks: nothing would gather the table, so the word module is called, as PEFT does."""
    torch.manual_seed(0)
    word = torch.nn.Embedding(11, 4)
    _mark_zero3(word.weight)
    rows = torch.randn(2, 3, 4, requires_grad=True)
    ids = torch.randint(0, 11, (3, 5))
    index = torch.tensor([1, 0, 1])
    assert deepspeed_zero3.run_gathered(word, word.weight, [], ids, lambda: rows) is None
    before = CALLS["unfused"]
    out = prompted_inputs_embeds(ids, word, rows, index)
    assert CALLS["unfused"] == before + 1
    torch.testing.assert_close(out, torch.cat((rows[index], word(ids)), dim=1), atol=0, rtol=0)
