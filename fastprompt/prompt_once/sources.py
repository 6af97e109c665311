"""Which prompts a PEFT model's batch runs: one :class:`~fastprompt.prompted_embeds.PromptSource` per distinct
prompt, and the prompt of each batch row.

A batch's prompts are those of the active adapter (one), of a mixed batch's adapters (``adapter_names``),
or, for multitask prompt tuning, one per distinct (adapter, task) of its rows (``task_ids``). Each
adapter's PEFT type says where its rows come from (``fastprompt.prompted_embeds``): prompt tuning's table,
P-tuning's encoder (or its stored output in inference mode, as PEFT's ``get_prompt`` reads it), a
multitask table scaled for one task. The forward, the shared prompt prefix and the prompt-KV store all
take the rows from here, so they are always the encoder's output, never the table before it.
"""

from __future__ import annotations

import torch

from ..prompted_embeds.config import MULTITASK_PROMPT_TUNING, P_TUNING
from ..prompted_embeds.prompt_rows import ENCODER, STORED, TABLE, TASK, PromptSource


def adapter_source(peft_model, name: str, task: int | None = None) -> PromptSource:
    """The prompt of adapter ``name`` (for multitask: of its task ``task``)."""
    config = peft_model.peft_config[name]
    module = peft_model.prompt_encoder[name]
    peft_type = getattr(config, "peft_type", None)
    if peft_type == P_TUNING:
        return PromptSource(module, STORED if config.inference_mode else ENCODER)
    if peft_type == MULTITASK_PROMPT_TUNING:
        if task is None:
            raise ValueError("task_ids cannot be None")  # PEFT's MultitaskPromptEmbedding.forward
        return PromptSource(module, TASK, task)
    return PromptSource(module, TABLE)


def batch_sources(peft_model, rows, device=None) -> tuple[list[PromptSource], torch.Tensor | None]:
    """(sources, index): the K prompts of a batch and ``[B]`` int64 the prompt of each row (on
    ``device``; None: K = 1, every row takes the active adapter's prompt).

    ``rows``: the integration's ``RowAdapters`` (``names`` of the K prompts, ``table_index`` per row,
    ``tasks`` per prompt for multitask) or None (the active adapter).
    """
    if rows is None:
        return [adapter_source(peft_model, peft_model.active_adapter)], None
    tasks = getattr(rows, "tasks", None) or (None,) * len(rows.names)
    sources = [adapter_source(peft_model, name, task) for name, task in zip(rows.names, tasks, strict=True)]
    return sources, torch.tensor(rows.table_index, dtype=torch.int64, device=device)
