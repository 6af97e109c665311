"""The one fused ``prompt_concat`` call behind the module layer, and what a prompt table is.

:func:`prompt_table` says whether a prompt-embedding module is a plain table the op can read (else its
module must be called); :func:`fused` makes the one ``prompt_concat`` call over one or K tables once the
word-embedding module's lookup spec and the tables are known (and, under ZeRO-3, gathered). Both
:mod:`fastprompt.prompted_embeds` and :mod:`fastprompt.prompted_embeds.deepspeed_zero3` use them; this
module imports neither, so the module layer's imports go one way.

``CALLS`` counts the module layer's outcomes ("fused" here, "unfused" in ``prompted_embeds``), for tests
and diagnostics.
"""

from __future__ import annotations

import ast
import collections

import torch

from ..ops import prompt_concat
from .word_embeddings import FUSABLE_DTYPES, forward_statements, full_shape, plain_lookup_options

CALLS: collections.Counter = collections.Counter()

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


def fused(input_ids, spec, tables: list[torch.Tensor], index, num_prompt: int) -> torch.Tensor:
    """The one ``prompt_concat`` call, once the word-embedding ``spec`` and the [P, D] ``tables`` are
    checked (and, under ZeRO-3, gathered): [B, N + L, D] as :func:`prompted_inputs_embeds` says."""
    weight = spec.weight
    tables = [t if t.device == weight.device else t.to(weight.device) for t in tables]
    if index is None:
        rows = tables[0] if num_prompt == tables[0].shape[0] else tables[0][:num_prompt]
        prompt_indices = None
    else:
        # The tables' first N rows stacked [K*N, D]; row b takes rows index[b]*N ... index[b]*N + N-1.
        rows = torch.cat([t[:num_prompt] for t in tables], dim=0)
        offsets = torch.arange(num_prompt, device=weight.device)
        prompt_indices = index.unsqueeze(1) * num_prompt + offsets
    out = prompt_concat(
        input_ids, weight, rows, prompt_indices, embed_scale=spec.embed_scale, padding_idx=spec.padding_idx
    )
    if spec.require_grad_hook and not out.requires_grad and torch.is_grad_enabled():
        out.requires_grad_(True)
    CALLS["fused"] += 1
    return out
