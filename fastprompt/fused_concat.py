"""The one fused ``prompt_concat`` call behind the module layer, and what a prompt table is.

:func:`prompt_table` says whether a prompt-embedding module is a plain table the op can read (else its
module must be called); :func:`fused` makes the one ``prompt_concat`` call over one or K tables once the
word-embedding module's lookup spec and the tables are known (and, under ZeRO-3, gathered). Both
:mod:`fastprompt.prompted_embeds` and :mod:`fastprompt.deepspeed_zero3` use them; this module imports
neither, so the module layer's imports go one way.

``CALLS`` counts the module layer's outcomes ("fused" here, "unfused" in ``prompted_embeds``), for tests
and diagnostics.
"""

from __future__ import annotations

import collections

import torch

from .ops import prompt_concat
from .word_embeddings import FUSABLE_DTYPES, full_shape, plain_lookup_options

CALLS: collections.Counter = collections.Counter()


def prompt_table(
    prompt_embedding: torch.nn.Module, *, ignore_hook=None, partitioned: bool = False
) -> torch.Tensor | None:
    """The [P, D] weight a prompt-embedding module looks its rows up in, or None where calling the module
    could give something else (a custom ``forward``, hooks, ``max_norm`` ...).

    ``prompt_embedding``: fastprompt's or PEFT's ``PromptEmbedding`` (anything whose ``embedding``
    attribute is the ``nn.Embedding`` its ``forward`` calls). ``ignore_hook`` / ``partitioned``: as in
    :func:`fastprompt.word_embeddings.lookup_spec`, for a caller that gathers the table itself.
    """
    embedding = getattr(prompt_embedding, "embedding", None)
    if not isinstance(embedding, torch.nn.Embedding):
        return None
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
