"""The N rows a prompt module puts before the tokens, whatever computes them, and the fused concat over them.

PEFT's soft-prompt methods that prepend N rows differ only in where the rows come from:

- prompt tuning (``PromptEmbedding``): the table itself, read by the op directly where it is a plain
  table (:func:`fastprompt.prompted_embeds.fused_concat.prompt_table`);
- P-tuning (``PromptEncoder``): an MLP or LSTM encoder over the table, ``module(arange(T)[None])``,
  computed once per forward as PEFT does; in inference mode (an adapter loaded from its file) the
  encoder's stored output, which PEFT keeps as the ``embedding`` weight and reads as it is;
- multitask prompt tuning (``MultitaskPromptEmbedding``): the table scaled per task,
  ``module(arange(T)[None].expand(K, -1), task_ids)``, once per distinct task (PEFT: once per batch row).

:class:`PromptSource` names one prompt (a module, how its rows come, and the task); :func:`source_rows`
computes the ``[K, N, D]`` rows of K sources by calling the modules as PEFT does (their hooks run, ZeRO-3
gathers every parameter of the encoder, gradients reach every trainable parameter);
:func:`rows_inputs_embeds` is :func:`fastprompt.prompted_embeds.prompted_inputs_embeds` over such rows:
one ``prompt_concat`` call, the rows being the encoder's output, never the table before it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from . import deepspeed_zero3
from .fused_concat import CALLS, fused
from .word_embeddings import FUSABLE_DTYPES, lookup_spec

TABLE = "table"  # prompt tuning: the table, looked up
ENCODER = "encoder"  # P-tuning in training mode: the encoder's output over the table
STORED = "stored"  # P-tuning in inference mode: the encoder's output as stored (the embedding weight)
TASK = "task"  # multitask prompt tuning: the table scaled for one task
KINDS = (TABLE, ENCODER, STORED, TASK)


@dataclasses.dataclass(frozen=True, eq=False)
class PromptSource:
    """One prompt of a batch: where its rows come from.

    Attributes:
        module: the prompt module (``PromptEmbedding``, ``PromptEncoder``, ``MultitaskPromptEmbedding``).
        kind: one of ``KINDS``.
        task: the task id (``TASK`` only).
    """

    module: torch.nn.Module
    kind: str
    task: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == TASK) != (self.task is not None):
            need = "a" if self.kind == TASK else "no"
            raise ValueError(f"a {self.kind!r} prompt source takes {need} task id")


def _tokens(module: torch.nn.Module) -> torch.Tensor:
    """[1, T] ``arange(T)`` on the table's device, T the rows of the module's table (ZeRO-3: full shape)."""
    weight = module.embedding.weight
    count = getattr(weight, "ds_shape", weight.shape)[0]
    return torch.arange(count, device=weight.device).unsqueeze(0)


def source_rows(
    sources: Sequence[PromptSource], num_prompt: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The first ``num_prompt`` rows of each source, once per source (not per batch row).

    Each module is called as PEFT's ``get_prompt`` calls it: ``module(arange(T)[None])`` (prompt tuning,
    P-tuning), ``module.embedding`` for P-tuning's stored rows (PEFT reads that weight as it is: the
    lookup gives the same values and lets ZeRO-3 gather it), and for multitask ONE call per module over
    its distinct tasks, ``module(arange(T)[None].expand(K, -1), task_ids)``.

    Args:
        sources: K :class:`PromptSource`.
        num_prompt: N (tables may have more rows: seq2seq keeps 2N, of which the encoder takes N).
        dtype: cast the rows to it (PEFT casts its prompts to the word embeddings' dtype); None keeps
            the modules' dtype (fp32).

    Returns:
        [K, N, D]: row k holds source k's rows, with the gradient path to its module's parameters.
    """
    rows: list = [None] * len(sources)
    tasks: dict = {}  # module -> [(position, task)]
    for k, source in enumerate(sources):
        if source.kind == TASK:
            tasks.setdefault(source.module, []).append((k, source.task))
        elif source.kind == STORED:
            rows[k] = source.module.embedding(_tokens(source.module))[:, :num_prompt]
        else:
            rows[k] = source.module(_tokens(source.module))[:, :num_prompt]
    for module, entries in tasks.items():
        tokens = _tokens(module)
        ids = torch.tensor([task for _, task in entries], dtype=torch.int64, device=tokens.device)
        scaled = module(tokens.expand(len(entries), -1), ids)[:, :num_prompt]  # [K_m, N, D]
        for j, (k, _) in enumerate(entries):
            rows[k] = scaled[j : j + 1]
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out if dtype is None else out.to(dtype)


def rows_inputs_embeds(
    input_ids: torch.Tensor,
    word_embeddings: torch.nn.Module,
    rows: torch.Tensor,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prompt rows, then ``word_embeddings(input_ids)``, per batch row, in one ``prompt_concat`` call.

    Args:
        input_ids: [B, L] int64 or int32 token ids.
        word_embeddings: the model's word-embedding module (reproduced inside the op where fastprompt
            knows its ``forward``; else called, as PEFT does). A DeepSpeed ZeRO-3 word table: the op
            runs as the module's ``forward``, its ZeRO-3 hooks gathering the table around it
            (:func:`fastprompt.prompted_embeds.deepspeed_zero3.fused_rows_with_gathered_word`).
        rows: [K, N, D] prompt rows (:func:`source_rows`: an encoder's output, with grad, or any tensor).
        index: [B] int64, the prompt (of K) of each batch row; None: K = 1, every row takes it.

    Returns:
        [B, N + L, D] in the word embeddings' dtype: row b equals
        ``cat(rows[index[b]].to(dtype), word_embeddings(input_ids[b]))``, with gradients to ``rows`` (and
        through them to the encoder) and to the word table where it requires grad.
    """
    if rows.dim() != 3 or (index is None and rows.shape[0] != 1):
        raise ValueError(f"rows must be [K, N, D] (K = 1 without index), got {tuple(rows.shape)}")
    num_prompt = rows.shape[1]
    if index is not None:
        index = index.to(device=input_ids.device, dtype=torch.int64)
    weight = getattr(word_embeddings, "weight", None)
    spec = None
    if deepspeed_zero3.is_zero3_param(weight):  # ZeRO-3: the word module's hooks gather its table
        if rows.dtype in FUSABLE_DTYPES:
            out = deepspeed_zero3.fused_rows_with_gathered_word(
                input_ids, word_embeddings, rows, index, num_prompt
            )
            if out is not None:
                return out
    else:
        spec = lookup_spec(word_embeddings)
    if spec is None or rows.dtype not in FUSABLE_DTYPES or input_ids.device != spec.weight.device:
        CALLS["unfused"] += 1
        inputs_embeds = word_embeddings(input_ids)
        rows = rows.to(inputs_embeds.device)
        prompts = rows.expand(input_ids.shape[0], -1, -1) if index is None else rows[index]
        return torch.cat((prompts.to(inputs_embeds.dtype), inputs_embeds), dim=1)
    rows = rows.to(spec.weight.device)
    return fused(input_ids, spec, list(rows.unbind(0)), index, num_prompt)
