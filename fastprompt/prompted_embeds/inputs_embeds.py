"""The module-layer operation: word-embedding module + prompt table(s) + input ids -> ``inputs_embeds``.

:func:`prompted_inputs_embeds` is what a prompt-tuned model feeds its base model: for each batch row, the
first N rows of that row's prompt table, then ``word_embeddings(input_ids)``. It builds it with ONE
``prompt_concat`` call whatever the number of prompt tables (several tables: their first N rows are stacked
and each batch row selects its own through per-row ``prompt_indices``). Where the word-embedding module cannot
be reproduced inside the op (see :func:`fastprompt.prompted_embeds.word_embeddings.lookup_spec`) or a prompt
module is not a plain table, the modules are called and the rows concatenated, which is exactly what PEFT
does; that is logged at debug level on the ``fastprompt`` logger.

``CALLS`` counts both outcomes ("fused" / "unfused"), for tests and diagnostics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from . import deepspeed_zero3
from .fused_concat import CALLS, fused, prompt_table
from .word_embeddings import lookup_spec

__all__ = ["CALLS", "prompt_table", "prompted_inputs_embeds"]

logger = logging.getLogger("fastprompt")


def _as_modules(prompt_embeddings) -> list[torch.nn.Module]:
    if isinstance(prompt_embeddings, torch.nn.Module):
        return [prompt_embeddings]
    if isinstance(prompt_embeddings, Sequence) and not isinstance(prompt_embeddings, (str, bytes)):
        modules = list(prompt_embeddings)
        if modules and all(isinstance(m, torch.nn.Module) for m in modules):
            return modules
    raise TypeError(
        "prompt_embeddings must be a prompt-embedding module (e.g. fastprompt.PromptEmbedding) or a "
        f"non-empty sequence of them, got {type(prompt_embeddings).__name__}"
    )


def _check_input_ids(input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"input_ids must be a torch.Tensor [B, L] of token ids, got {type(input_ids).__name__}"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"input_ids must hold integer token ids (torch.int64 or torch.int32), got dtype {input_ids.dtype}"
        )
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be a 2-D tensor [B, L], got a tensor of shape {tuple(input_ids.shape)}"
        )


def _table_index(table_index, num_tables: int, batch_size: int, device) -> torch.Tensor | None:
    """[B] int64 on ``device``: which table each batch row takes (None: table 0 for every row)."""
    if table_index is None:
        if num_tables > 1:
            raise ValueError(
                f"{num_tables} prompt tables were given but no table_index: pass a [B] tensor (or list) "
                "naming the table of each batch row"
            )
        return None
    if isinstance(table_index, torch.Tensor):
        if table_index.dim() != 1 or table_index.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"table_index must be a 1-D integer tensor [B], got {table_index.dtype} of shape "
                f"{tuple(table_index.shape)}"
            )
        index = table_index.to(device=device, dtype=torch.int64)
    else:
        values = list(table_index)
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < num_tables]
        if bad:
            raise ValueError(
                f"table_index must hold table numbers in [0, {num_tables}), got {bad[0]!r} among {values}"
            )
        if len(values) == batch_size and num_tables == 1:
            return None  # checked above: every row takes the only table
        index = torch.tensor(values, dtype=torch.int64, device=device)
    if index.shape[0] != batch_size:
        raise ValueError(
            f"table_index has {index.shape[0]} entries but input_ids has B={batch_size} rows: one table "
            "number per batch row is expected"
        )
    return index


def _num_prompt(modules: list[torch.nn.Module], num_prompt: int | None) -> int:
    rows = [m.embedding.weight.shape[0] if hasattr(m, "embedding") else None for m in modules]
    if num_prompt is None:
        if len(set(rows)) != 1 or rows[0] is None:
            raise ValueError(
                f"the prompt tables have {rows} rows: pass num_prompt (N, the rows each batch row takes)"
            )
        return rows[0]
    short = [r for r in rows if r is not None and r < num_prompt]
    if isinstance(num_prompt, bool) or not isinstance(num_prompt, int) or num_prompt < 0 or short:
        raise ValueError(f"num_prompt={num_prompt!r} must be an int in [0, rows of every table {rows}]")
    return num_prompt


def _unfused(input_ids, word_embeddings, modules, index, num_prompt: int, reason: str) -> torch.Tensor:
    """PEFT's own steps: call the word-embedding module and each prompt module, cast, concatenate."""
    CALLS["unfused"] += 1
    logger.debug("fastprompt: unfused prompt concat (%s)", reason)
    inputs_embeds = word_embeddings(input_ids)
    batch = input_ids.shape[0]
    prompts = []
    for module in modules:
        rows = module.embedding.weight.shape[0] if hasattr(module, "embedding") else num_prompt
        tokens = torch.arange(rows, device=input_ids.device).unsqueeze(0)
        prompts.append(module(tokens)[:, :num_prompt].to(inputs_embeds.device))
    if index is None:
        prompt_rows = prompts[0].expand(batch, -1, -1)
    else:
        prompt_rows = torch.cat(prompts, dim=0)[index]
    return torch.cat((prompt_rows.to(inputs_embeds.dtype), inputs_embeds), dim=1)


def prompted_inputs_embeds(
    input_ids: torch.Tensor,
    word_embeddings: torch.nn.Module,
    prompt_embeddings: torch.nn.Module | Sequence[torch.nn.Module],
    table_index: torch.Tensor | Sequence[int] | None = None,
    *,
    num_prompt: int | None = None,
) -> torch.Tensor:
    """Prompt rows, then ``word_embeddings(input_ids)``, per batch row, in one ``prompt_concat`` call.

    Args:
        input_ids: [B, L] int64 or int32 token ids.
        word_embeddings: the model's word-embedding module (``nn.Embedding`` or a scaled subclass such
            as Gemma's or BART's: its scale and ``padding_idx`` are applied as the module would).
        prompt_embeddings: one prompt-embedding module (fastprompt's or PEFT's ``PromptEmbedding``),
            or a sequence of K of them.
        table_index: [B] (tensor or list of ints in [0, K)): the prompt module of each batch row.
            Required when K > 1; None with one module means every row takes it.
        num_prompt: N, how many of each table's first rows go before the tokens (default: all rows;
            seq2seq tables have 2N rows, of which the encoder takes N).

    Returns:
        [B, N + L, D] in the word embeddings' dtype: with ``k = table_index[b]``, row b equals
        ``cat(prompt_embeddings[k].embedding.weight[:N].to(dtype), word_embeddings(input_ids[b]))``
        bit for bit, with gradients to every prompt table (only the rows used) and to the word table
        where it requires grad.

    Raises:
        TypeError / ValueError: ``input_ids``, ``prompt_embeddings``, ``table_index`` or ``num_prompt``
            of the wrong type or shape.
    """
    _check_input_ids(input_ids)
    modules = _as_modules(prompt_embeddings)
    num_prompt = _num_prompt(modules, num_prompt)
    index = _table_index(table_index, len(modules), input_ids.shape[0], input_ids.device)
    if deepspeed_zero3.is_zero3(word_embeddings, modules):
        # ZeRO-3: the tables are gathered by ZeRO-3's own module hooks around the fused op.
        out = deepspeed_zero3.fused_with_gathered_tables(
            input_ids, word_embeddings, modules, index, num_prompt
        )
        if out is None:
            return _unfused(input_ids, word_embeddings, modules, index, num_prompt, "ZeRO-3 modules")
        return out
    spec = lookup_spec(word_embeddings)
    if spec is None:
        return _unfused(input_ids, word_embeddings, modules, index, num_prompt, "word-embedding module")
    tables = [prompt_table(m) for m in modules]
    if any(t is None for t in tables):
        return _unfused(input_ids, word_embeddings, modules, index, num_prompt, "prompt module not a table")
    weight = spec.weight
    if input_ids.device != weight.device:
        return _unfused(input_ids, word_embeddings, modules, index, num_prompt, "devices")
    return fused(input_ids, spec, tables, index, num_prompt)

