"""A PEFT soft-prompt model's ``inputs_embeds``: routes to the module layer's one entry point.

The batch's prompts (the active adapter's, or each row's adapter's; for multitask, each row's task) go
as :class:`~fastprompt.prompted_embeds.PromptSource` to
:func:`fastprompt.prompted_embeds.prompted_inputs_embeds` with the PEFT model's word-embedding module: a
prompt-tuning table is read as it is, P-tuning's encoder output and multitask's task-scaled rows are
computed once per prompt of the batch, and one fused call concatenates them. Nothing here touches a table.
"""

from __future__ import annotations

import torch

from ..prompt_once.sources import batch_sources
from ..prompted_embeds import CALLS, prompted_inputs_embeds
from .adapter_batches import RowAdapters

__all__ = ["CALLS", "model_inputs_embeds"]


def model_inputs_embeds(
    peft_model, input_ids: torch.Tensor, num_prompt: int, rows: RowAdapters | None = None
) -> torch.Tensor:
    """The active adapter's first ``num_prompt`` prompt rows (or each row's adapter's, with ``rows``),
    then the token rows of ``input_ids``.

    Args:
        peft_model: a PEFT model whose active adapter is prompt tuning, P-tuning or multitask.
        input_ids: [B, L] token ids (int64 or int32).
        num_prompt: N, the virtual tokens to put before the tokens (the table may have more rows:
            seq2seq models have 2N, of which the encoder uses N).
        rows: for a mixed-adapter batch, which adapter each row takes (``rows_for_adapters``).

    Returns:
        [B, N + L, D] in the word embeddings' dtype: equal to PEFT's
        ``cat((get_prompt(B)[:, :N].to(dtype), word_embeddings(input_ids)), 1)``.
    """
    sources, _ = batch_sources(peft_model, rows)
    table_index = None if rows is None else list(rows.table_index)
    return prompted_inputs_embeds(
        input_ids, peft_model.word_embeddings, sources, table_index, num_prompt=num_prompt
    )
