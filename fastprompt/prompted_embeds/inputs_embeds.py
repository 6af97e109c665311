"""The module layer's one entry point: word-embedding module + K prompts + input ids -> ``inputs_embeds``.

:func:`prompted_inputs_embeds` is what a soft-prompted model feeds its base model: for each batch row, the
first N rows of that row's prompt, then ``word_embeddings(input_ids)``, built with ONE ``prompt_concat``
call whatever the number of prompts and wherever their rows come from. Every prompt source goes through
it, each resolved to what the op reads:

- a table (prompt tuning's ``PromptEmbedding``, fastprompt's or PEFT's) to its weight, as it is (no copy);
- P-tuning's encoder or multitask's task scaling (a :class:`~fastprompt.prompted_embeds.PromptSource`) to
  the rows its module computes (:func:`~fastprompt.prompted_embeds.prompt_rows.source_rows`), once per
  prompt;
- rows computed already (a ``[K, N, D]`` tensor) to themselves.

Several prompts: their first N rows are stacked and each batch row selects its own through per-row
``prompt_indices``. There is one ZeRO-3 branch (the op runs inside the modules whose ZeRO-3 hooks gather
the tables: :func:`~fastprompt.prompted_embeds.deepspeed_zero3.run_gathered`) and one fallback: where the
word-embedding module cannot be reproduced inside the op (see
:func:`fastprompt.prompted_embeds.word_embeddings.lookup_spec`), a table module is not a plain table, or
the tables cannot be gathered, the modules are called and the rows concatenated, which is exactly what
PEFT does; that is logged at debug level on the ``fastprompt`` logger.

``CALLS`` counts both outcomes ("fused" / "unfused"), for tests and diagnostics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from . import deepspeed_zero3
from .fused_concat import CALLS, fused
from .prompt_rows import TABLE, PromptSource, prompt_table, source_rows
from .word_embeddings import FUSABLE_DTYPES, full_shape, lookup_spec

__all__ = ["CALLS", "prompted_inputs_embeds"]

logger = logging.getLogger("fastprompt")

# What the entry point takes as its K prompts (see ``prompted_inputs_embeds``).
Prompts = torch.nn.Module | PromptSource | Sequence[torch.nn.Module | PromptSource] | torch.Tensor


def _as_sources(prompt_embeddings) -> list[PromptSource]:
    """The prompts as sources: a module is a table (``TABLE``), a ``PromptSource`` says what it is."""
    if isinstance(prompt_embeddings, (torch.nn.Module, PromptSource)):
        prompts = [prompt_embeddings]
    elif isinstance(prompt_embeddings, Sequence) and not isinstance(prompt_embeddings, (str, bytes)):
        prompts = list(prompt_embeddings)
    else:
        prompts = []
    if prompts and all(isinstance(p, (torch.nn.Module, PromptSource)) for p in prompts):
        return [p if isinstance(p, PromptSource) else PromptSource(p, TABLE) for p in prompts]
    raise TypeError(
        "prompt_embeddings must be a prompt-embedding module (e.g. fastprompt.PromptEmbedding), a "
        "PromptSource, a non-empty sequence of them, or a [K, N, D] tensor of prompt rows, got "
        f"{type(prompt_embeddings).__name__}"
    )


def _given_rows(rows: torch.Tensor, table_index, num_prompt: int | None) -> tuple[list, int]:
    """Rows computed already, [K, N, D]: (K blocks [N, D], N checked)."""
    if rows.dim() != 3 or (table_index is None and rows.shape[0] != 1):
        raise ValueError(
            f"prompt rows must be [K, N, D] (K = 1 without index: pass table_index), got {tuple(rows.shape)}"
        )
    if num_prompt is None:
        return list(rows.unbind(0)), rows.shape[1]
    if (
        isinstance(num_prompt, bool)
        or not isinstance(num_prompt, int)
        or not 0 <= num_prompt <= rows.shape[1]
    ):
        raise ValueError(f"num_prompt={num_prompt!r} must be an int in [0, N={rows.shape[1]}]")
    return list(rows.unbind(0)), num_prompt


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
    """N: ``num_prompt`` checked against the rows of every table, or those rows where they agree."""
    rows = [full_shape(m.embedding.weight)[0] if hasattr(m, "embedding") else None for m in modules]
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


def _unfused(
    input_ids, word_embeddings, sources, blocks, index, num_prompt: int, reason: str
) -> torch.Tensor:
    """PEFT's own steps: call the word-embedding module and each table's module, cast, concatenate (rows
    computed already are taken as they are)."""
    CALLS["unfused"] += 1
    logger.debug("fastprompt: unfused prompt concat (%s)", reason)
    inputs_embeds = word_embeddings(input_ids)
    batch = input_ids.shape[0]
    prompts = []
    for source, rows in zip(sources, blocks, strict=True):
        if source is not None and source.kind == TABLE:
            module = source.module
            count = full_shape(module.embedding.weight)[0] if hasattr(module, "embedding") else num_prompt
            tokens = torch.arange(count, device=input_ids.device).unsqueeze(0)
            rows = module(tokens)[0]
        prompts.append(rows[None, :num_prompt].to(inputs_embeds.device))
    if index is None:
        prompt_rows = prompts[0].expand(batch, -1, -1)
    else:
        prompt_rows = torch.cat(prompts, dim=0)[index]
    return torch.cat((prompt_rows.to(inputs_embeds.dtype), inputs_embeds), dim=1)


def prompted_inputs_embeds(
    input_ids: torch.Tensor,
    word_embeddings: torch.nn.Module,
    prompt_embeddings: Prompts,
    table_index: torch.Tensor | Sequence[int] | None = None,
    *,
    num_prompt: int | None = None,
) -> torch.Tensor:
    """Prompt rows, then ``word_embeddings(input_ids)``, per batch row, in one ``prompt_concat`` call.

    Args:
        input_ids: [B, L] int64 or int32 token ids.
        word_embeddings: the model's word-embedding module (``nn.Embedding`` or a scaled subclass such
            as Gemma's or BART's: its scale and ``padding_idx`` are applied as the module would).
        prompt_embeddings: the K prompts: one or a sequence of prompt-embedding modules (fastprompt's or
            PEFT's ``PromptEmbedding``: tables) or :class:`~fastprompt.prompted_embeds.PromptSource`
            (P-tuning's encoder, multitask's task, or a table); or a [K, N, D] tensor of rows computed
            already.
        table_index: [B] (tensor or list of ints in [0, K)): the prompt of each batch row. Required when
            K > 1; None with one prompt means every row takes it.
        num_prompt: N, how many of each prompt's first rows go before the tokens (default: all rows;
            seq2seq tables have 2N rows, of which the encoder takes N).

    Returns:
        [B, N + L, D] in the word embeddings' dtype: with ``k = table_index[b]`` and ``rows_k`` prompt k's
        rows (a table's weight, a module's computed rows), row b equals
        ``cat(rows_k[:N].to(dtype), word_embeddings(input_ids[b]))`` bit for bit, with gradients to every
        prompt (only the rows used; through a module to its parameters) and to the word table where it
        requires grad.

    Raises:
        TypeError / ValueError: ``input_ids``, ``prompt_embeddings``, ``table_index`` or ``num_prompt``
            of the wrong type or shape.
    """
    _check_input_ids(input_ids)
    if isinstance(prompt_embeddings, torch.Tensor):
        blocks, num_prompt = _given_rows(prompt_embeddings, table_index, num_prompt)
        sources: list = [None] * len(blocks)
    else:
        sources = _as_sources(prompt_embeddings)
        num_prompt = _num_prompt([s.module for s in sources], num_prompt)
        computed = [s for s in sources if s.kind != TABLE]  # encoders, tasks: their modules' rows, once each
        rows = iter(source_rows(computed, num_prompt) if computed else ())
        blocks = [None if s.kind == TABLE else next(rows) for s in sources]
    index = _table_index(table_index, len(blocks), input_ids.shape[0], input_ids.device)
    tables = [s.module for s in sources if s is not None and s.kind == TABLE]
    zero3 = deepspeed_zero3.is_zero3(word_embeddings, tables)
    gathers = {"ignore_hook": deepspeed_zero3.is_zero3_hook, "partitioned": True} if zero3 else {}
    spec = lookup_spec(word_embeddings, **gathers)
    if spec is None:
        reason = "word-embedding module"
    else:
        for k, source in enumerate(sources):
            if source is not None and source.kind == TABLE:
                blocks[k] = prompt_table(source.module, **gathers)  # the weight itself, or None
        reason = (
            "prompt module not a table"
            if any(b is None for b in blocks)
            else "prompt rows' dtype"
            if any(b.dtype not in FUSABLE_DTYPES for b in blocks)
            else "devices"
            if input_ids.device != spec.weight.device
            else None
        )
    if reason is not None:
        return _unfused(input_ids, word_embeddings, sources, blocks, index, num_prompt, reason)

    def run() -> torch.Tensor:
        return fused(input_ids, spec, blocks, index, num_prompt)

    if not zero3:
        return run()
    # ZeRO-3: the tables are gathered by ZeRO-3's own module hooks around the fused op.
    out = deepspeed_zero3.run_gathered(word_embeddings, spec.weight, tables, input_ids, run)
    if out is None:
        return _unfused(input_ids, word_embeddings, sources, blocks, index, num_prompt, "ZeRO-3 modules")
    return out
