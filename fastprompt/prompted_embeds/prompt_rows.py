"""Where the N rows a prompt puts before the tokens come from: a table read as it is, or computed rows.

PEFT's soft-prompt methods that prepend N rows differ only in where the rows come from:

- prompt tuning (``PromptEmbedding``): the table itself, read by the op directly, without a copy, where
  it is a plain table (:func:`prompt_table`);
- P-tuning (``PromptEncoder``): an MLP or LSTM encoder over the table, ``module(arange(T)[None])``,
  computed once per forward as PEFT does; in inference mode (an adapter loaded from its file) the
  encoder's stored output, which PEFT keeps as the ``embedding`` weight and reads as it is;
- multitask prompt tuning (``MultitaskPromptEmbedding``): the table scaled per task,
  ``module(arange(T)[None].expand(K, -1), task_ids)``, once per distinct task (PEFT: once per batch row).

:class:`PromptSource` names one prompt (a module, how its rows come, and the task); :func:`prompt_table`
says whether a module is a plain table the op can read; :func:`source_rows` computes the ``[K, N, D]``
rows of K sources by calling the modules as PEFT does (their hooks run, ZeRO-3 gathers every parameter of
the encoder, gradients reach every trainable parameter). The module layer's one entry point,
:func:`fastprompt.prompted_embeds.prompted_inputs_embeds`, takes any of them into one ``prompt_concat``.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Sequence

import torch

from .word_embeddings import FUSABLE_DTYPES, forward_statements, full_shape, plain_lookup_options

TABLE = "table"  # prompt tuning: the table, looked up
ENCODER = "encoder"  # P-tuning in training mode: the encoder's output over the table
STORED = "stored"  # P-tuning in inference mode: the encoder's output as stored (the embedding weight)
TASK = "task"  # multitask prompt tuning: the table scaled for one task
KINDS = (TABLE, ENCODER, STORED, TASK)


# The bodies of a prompt module's ``forward`` that return the table's rows as they are (fastprompt's and
# PEFT's ``PromptEmbedding``). P-tuning's ``PromptEncoder`` and multitask's ``MultitaskPromptEmbedding``
# also have an ``embedding``, but their rows are an encoder's output / task-scaled: not a plain table.
_PLAIN_SOURCES = (
    "return self.embedding(indices)",
    "prompt_embeddings = self.embedding(indices)\nreturn prompt_embeddings",
)
_PLAIN_DUMPS = frozenset(ast.dump(ast.parse(src)) for src in _PLAIN_SOURCES)
_PLAIN_FORWARDS: dict = {}  # class -> whether its forward is a plain table lookup (cached per class)


def plain_forward(cls: type) -> bool:
    """Whether ``cls.forward`` returns ``self.embedding(indices)`` and nothing else (read off its source,
    as :func:`fastprompt.prompted_embeds.word_embeddings.forward_kind` does for word embeddings; cached
    per class)."""
    if cls not in _PLAIN_FORWARDS:
        _PLAIN_FORWARDS[cls] = _plain_forward(cls)
    return _PLAIN_FORWARDS[cls]


def _plain_forward(cls: type) -> bool:
    body = forward_statements(getattr(cls, "forward", None), ["self", "indices"])
    return body is not None and ast.dump(ast.Module(body=body, type_ignores=[])) in _PLAIN_DUMPS


def prompt_table(
    prompt_embedding: torch.nn.Module, *, ignore_hook=None, partitioned: bool = False
) -> torch.Tensor | None:
    """The [P, D] weight a prompt-embedding module looks its rows up in, or None where calling the module
    could give something else (a custom ``forward``, hooks, ``max_norm`` ...).

    ``prompt_embedding``: fastprompt's or PEFT's ``PromptEmbedding`` (any module whose ``forward`` is
    exactly ``return self.embedding(indices)``, its ``embedding`` a plain ``nn.Embedding``). A module with
    an ``embedding`` and another ``forward`` (P-tuning's ``PromptEncoder``: an MLP / LSTM over the table;
    ``MultitaskPromptEmbedding``: the table scaled per task) is not a table: None.
    ``ignore_hook`` / ``partitioned``: as in :func:`fastprompt.prompted_embeds.word_embeddings.lookup_spec`,
    for a caller that gathers the table itself.
    """
    embedding = getattr(prompt_embedding, "embedding", None)
    if not isinstance(embedding, torch.nn.Embedding):
        return None
    if "forward" in prompt_embedding.__dict__ or not plain_forward(type(prompt_embedding)):
        return None  # P-tuning's encoder, multitask's task scaling, any other forward: call the module
    if type(embedding).forward is not torch.nn.Embedding.forward or "forward" in embedding.__dict__:
        return None
    if not plain_lookup_options(embedding):
        return None
    for module in (prompt_embedding, embedding):
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks):
            if any(ignore_hook is None or not ignore_hook(hook) for hook in hooks.values()):
                return None
    weight = embedding.weight
    shape = full_shape(weight) if partitioned else tuple(weight.shape)
    if len(shape) != 2 or weight.dtype not in FUSABLE_DTYPES or weight.is_meta:
        return None
    if weight.numel() == 0 and not (partitioned and shape != tuple(weight.shape)):
        return None  # ZeRO-3 sharded or not materialized: the module call gathers it
    return weight


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
