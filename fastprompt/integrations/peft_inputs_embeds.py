"""A PEFT prompt-tuning model's ``inputs_embeds``: routes to the module layer's fused operation.

P-tuning and multitask adapters: their rows (the encoder's output, the task-scaled table) are computed
once per prompt of the batch (``fastprompt.prompted_embeds.prompt_rows``) and concatenated in the same
one fused call.

The PEFT model's word-embedding module and its prompt-embedding module(s) go to
:func:`fastprompt.prompted_embeds.prompted_inputs_embeds` (the module layer); nothing here touches a table.
"""

from __future__ import annotations

import torch

from ..prompt_once.sources import batch_sources
from ..prompted_embeds import CALLS, prompted_inputs_embeds
from ..prompted_embeds.prompt_rows import TABLE, rows_inputs_embeds, source_rows
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
    sources, index = batch_sources(peft_model, rows, input_ids.device)
    if any(source.kind != TABLE for source in sources):
        # P-tuning / multitask: the rows are the encoder's output (or task-scaled), computed once per
        # prompt, then one fused concat over them
        prompt_rows = source_rows(sources, num_prompt)
        return rows_inputs_embeds(input_ids, peft_model.word_embeddings, prompt_rows, index)
    if rows is None:
        prompt_encoder = peft_model.prompt_encoder[peft_model.active_adapter]
        return prompted_inputs_embeds(
            input_ids, peft_model.word_embeddings, prompt_encoder, num_prompt=num_prompt
        )
    encoders = [peft_model.prompt_encoder[name] for name in rows.names]
    return prompted_inputs_embeds(
        input_ids, peft_model.word_embeddings, encoders, list(rows.table_index), num_prompt=num_prompt
    )
