"""P-tuning and multitask prompt tuning on fastprompt's machinery: the prompts of a batch.

PEFT's ``P_TUNING`` and ``MULTITASK_PROMPT_TUNING`` put N rows before the tokens exactly as prompt tuning
does; only where the rows come from differs (``fastprompt.prompted_embeds``). So the fused concat, the shared
prompt prefix, prompt-KV reuse and mixed batches serve them once a batch says which prompt each row
takes: :func:`batch_rows` turns ``adapter_names`` (beyond PEFT) and ``task_ids`` (multitask, PEFT's
keyword) into one :class:`~fastprompt.integrations.adapter_batches.RowAdapters`, with one prompt per
distinct (adapter, task) of the batch.
"""

from __future__ import annotations

import torch

from ..prompted_embeds.config import MULTITASK_PROMPT_TUNING, PREPENDED_PROMPT_TYPES
from .adapter_batches import RowAdapters, rows_for_adapters

TASK_IDS = "task_ids"


def prompt_method(config) -> bool:
    """Whether an adapter's config is one of the soft-prompt methods fastprompt serves (prompt tuning,
    P-tuning, multitask prompt tuning); prefix tuning and CPT are left to PEFT."""
    return getattr(config, "peft_type", None) in PREPENDED_PROMPT_TYPES


def is_multitask(peft_model) -> bool:
    """Whether the active adapter is multitask prompt tuning (its prompts need ``task_ids``)."""
    return getattr(peft_model.active_peft_config, "peft_type", None) == MULTITASK_PROMPT_TUNING


def forward_applies(peft_model, impl) -> bool:
    """Whether fastprompt's forward ``impl`` re-states PEFT's for the active adapter's method. Not for
    a multitask Seq2Seq model: PEFT's forward there also puts the second N task rows before the decoder
    inputs (and prefixes the labels), unlike prompt tuning; that forward stays PEFT's own (its
    ``generate`` puts rows before the encoder inputs only, and is fastprompt's)."""
    return not (getattr(impl, "__name__", "") == "seq2seq_forward" and is_multitask(peft_model))


def _task_list(task_ids, batch_size: int) -> list[int]:
    """``task_ids`` as B ints (one entry stands for every row, as PEFT's broadcast does)."""
    if task_ids is None:
        raise ValueError("task_ids cannot be None")  # PEFT's MultitaskPromptEmbedding.forward
    if isinstance(task_ids, torch.Tensor):
        if task_ids.dim() != 1 or task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
            raise ValueError(
                f"task_ids must be a 1-D integer tensor [B] (one task per batch row), got {task_ids.dtype} "
                f"of shape {tuple(task_ids.shape)}"
            )
        tasks = [int(t) for t in task_ids.tolist()]
    elif isinstance(task_ids, (list, tuple)) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in task_ids
    ):
        tasks = list(task_ids)
    else:
        raise TypeError(f"task_ids must be a 1-D integer tensor [B], got {type(task_ids).__name__}")
    if len(tasks) == 1 and batch_size != 1:
        tasks = tasks * batch_size
    if len(tasks) != batch_size:
        raise ValueError(
            f"task_ids has {len(tasks)} entries but the batch has {batch_size} rows: one task per batch row "
            "is expected"
        )
    return tasks


class TaskIdError(ValueError, IndexError):
    """A task id outside ``0 .. num_tasks - 1`` of its adapter. An IndexError too: PEFT's ``index_select``
    raises one there on the CPU (on a GPU it is a device-side assert that ends the process)."""


def _check_task_range(peft_model, names: list[str], tasks: list[int]) -> None:
    for row, (name, task) in enumerate(zip(names, tasks, strict=True)):
        num_tasks = getattr(peft_model.peft_config[name], "num_tasks", None)
        if isinstance(num_tasks, int) and not 0 <= task < num_tasks:
            raise TaskIdError(
                f"task_ids[{row}] is {task}, but adapter {name!r} has num_tasks={num_tasks}: task ids "
                f"0..{num_tasks - 1} are expected"
            )


def batch_rows(peft_model, adapter_names, task_ids, batch_size: int) -> RowAdapters | None:
    """Which prompt each batch row takes: None (the active adapter's, for every row), or the adapters of
    ``adapter_names`` (one per row), or for a multitask adapter one prompt per distinct (adapter, task).

    Args:
        peft_model: a PEFT model whose active adapter is a prepended soft prompt.
        adapter_names: None or one adapter name per row (``rows_for_adapters`` checks them).
        task_ids: multitask prompt tuning: [B] task ids (a tensor; one entry: every row). Ignored for the
            other methods, as PEFT ignores it.
        batch_size: B.

    The task ids are read on the host (one device sync where ``task_ids`` is on a GPU, as
    ``adapter_names`` are host strings): the distinct tasks decide how many prompts run, and each id is
    checked against its adapter's ``num_tasks``.

    Raises:
        ValueError: a multitask adapter without ``task_ids`` (PEFT's "task_ids cannot be None"), or
            ``task_ids`` of another length than B; :class:`TaskIdError` for a task id out of range; and
            what ``rows_for_adapters`` raises.
    """
    rows = None if adapter_names is None else rows_for_adapters(peft_model, adapter_names, batch_size)
    if not is_multitask(peft_model):
        return rows
    tasks = _task_list(task_ids, batch_size)
    names = (
        [peft_model.active_adapter] * batch_size
        if rows is None
        else [rows.names[k] for k in rows.table_index]
    )
    _check_task_range(peft_model, names, tasks)
    pairs = list(zip(names, tasks, strict=True))
    distinct = list(dict.fromkeys(pairs))
    position = {pair: k for k, pair in enumerate(distinct)}
    config = peft_model.active_peft_config
    num_virtual = config.num_virtual_tokens if rows is None else rows.num_virtual_tokens
    return RowAdapters(
        tuple(name for name, _ in distinct),
        tuple(position[pair] for pair in pairs),
        num_virtual,
        tuple(task for _, task in distinct),
    )
