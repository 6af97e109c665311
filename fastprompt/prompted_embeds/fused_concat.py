"""The one fused ``prompt_concat`` call behind the module layer.

:func:`fused` makes the one ``prompt_concat`` call over one or K prompt blocks (a table's weight, read as it
is, or rows an encoder computed) once the word-embedding module's lookup spec is known (and, under ZeRO-3,
the tables are gathered). Only the module layer's entry point,
:func:`fastprompt.prompted_embeds.prompted_inputs_embeds`, calls it.

``CALLS`` counts the module layer's outcomes ("fused" here, "unfused" in the entry point), for tests and
diagnostics.
"""

from __future__ import annotations

import collections

import torch

from ..ops import prompt_concat

CALLS: collections.Counter = collections.Counter()


def fused(input_ids, spec, tables: list[torch.Tensor], index, num_prompt: int) -> torch.Tensor:
    """The one ``prompt_concat`` call, once the word-embedding ``spec`` and the ``tables`` (each [P, D],
    P >= N: a table's weight or computed rows) are checked (and, under ZeRO-3, gathered): [B, N + L, D] as
    :func:`fastprompt.prompted_embeds.prompted_inputs_embeds` says."""
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
