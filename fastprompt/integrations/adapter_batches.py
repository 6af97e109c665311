"""Mixed-adapter batches (beyond PEFT): ``adapter_names=[one prompt-tuning adapter name per batch row]``.

PEFT's keyword for LoRA mixed batches, here for prompt tuning: row b of the batch gets the prompt of
adapter ``adapter_names[b]``, and equals that row run alone after ``set_adapter(adapter_names[b])``.
:func:`rows_for_adapters` checks the list against the model and says which prompt table each row takes;
the module layer then builds every row's ``inputs_embeds`` in one ``prompt_concat`` call.

:class:`AdapterNamesCollator` lets a ``Trainer`` dataset carry the names as a column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..prompted_embeds.config import PREPENDED_PROMPT_TYPES

ADAPTER_NAMES = "adapter_names"


@dataclass(frozen=True)
class RowAdapters:
    """Which prompt-tuning adapter each batch row takes.

    Attributes:
        names: the distinct adapter names, in order of first appearance (K of them); multitask: the
            adapter of each distinct (adapter, task) of the batch (a name can repeat).
        table_index: [B] ints in [0, K): row b takes adapter ``names[table_index[b]]``.
        num_virtual_tokens: N, shared by every adapter in the batch.
        tasks: multitask prompt tuning: the task of each of the K prompts (None: no tasks).
    """

    names: tuple[str, ...]
    table_index: tuple[int, ...]
    num_virtual_tokens: int
    tasks: tuple[int, ...] | None = None

    def repeat_rows(self, times: int) -> RowAdapters:
        """The same adapters for a batch whose every row is repeated ``times`` times in place
        (``repeat_interleave``, as ``generate`` expands rows for ``num_beams`` / ``num_return_sequences``)."""
        index = tuple(k for k in self.table_index for _ in range(times))
        return RowAdapters(self.names, index, self.num_virtual_tokens, self.tasks)


def _prompt_tuning_adapters(peft_model) -> list[str]:
    return [
        name
        for name, config in getattr(peft_model, "peft_config", {}).items()
        if getattr(config, "peft_type", None) in PREPENDED_PROMPT_TYPES
    ]


def rows_for_adapters(peft_model, adapter_names, batch_size: int) -> RowAdapters:
    """Check ``adapter_names`` against the model and the batch; say which table each row takes.

    Args:
        peft_model: a PEFT prompt-tuning model.
        adapter_names: a list (or tuple) of adapter names, one per batch row.
        batch_size: B, the rows of ``input_ids``.

    Raises:
        TypeError: ``adapter_names`` is not a list or tuple of strings.
        ValueError: its length is not B; a name the model does not have, or of an adapter that is not
            prompt tuning (the message lists the model's prompt-tuning adapters); adapters with different
            ``num_virtual_tokens``.
    """
    if not isinstance(adapter_names, (list, tuple)):
        raise TypeError(
            f"adapter_names must be a list with one adapter name per batch row, got "
            f"{type(adapter_names).__name__}"
        )
    not_str = [name for name in adapter_names if not isinstance(name, str)]
    if not_str:
        raise TypeError(f"adapter_names must hold adapter names (str), got {not_str[0]!r}")
    if len(adapter_names) != batch_size:
        raise ValueError(
            f"adapter_names has {len(adapter_names)} names but the batch has {batch_size} rows: one "
            "adapter name per batch row is expected"
        )
    available = _prompt_tuning_adapters(peft_model)
    names = tuple(dict.fromkeys(adapter_names))
    for name in names:
        if name not in available:
            kind = "is not a prompt-tuning adapter" if name in peft_model.peft_config else "is not an adapter"
            raise ValueError(
                f"adapter_names holds {name!r}, which {kind} of this model; its prompt-tuning adapters "
                f"are {available}"
            )
    tokens = {name: peft_model.peft_config[name].num_virtual_tokens for name in names}
    if len(set(tokens.values())) > 1:
        listed = ", ".join(f"{name!r}: N={n}" for name, n in tokens.items())
        raise ValueError(
            "adapter_names mixes prompt-tuning adapters with different num_virtual_tokens "
            f"({listed}); a mixed batch needs adapters with the same N: batch those rows separately"
        )
    position = {name: k for k, name in enumerate(names)}
    index = tuple(position[name] for name in adapter_names)
    return RowAdapters(names, index, tokens[names[0]] if names else 0)


def pop_adapter_names(kwargs: dict):
    """Remove and return ``adapter_names`` from a call's keyword arguments (None when absent)."""
    return kwargs.pop(ADAPTER_NAMES, None)


class AdapterNamesCollator:
    """Wrap a data collator so a dataset column of adapter names reaches the model as ``adapter_names``.

    Collators turn columns into tensors and drop (or choke on) strings; this one takes the ``column``
    entry out of every example, calls ``collator`` on the rest, and adds the names as a list.

        args = TrainingArguments(..., remove_unused_columns=False)
        trainer = Trainer(model, args, train_dataset=ds,
                          data_collator=AdapterNamesCollator(DataCollatorWithPadding(tokenizer)))

    ``remove_unused_columns=False`` is needed: Trainer keeps only the columns named in the BASE model's
    ``forward`` signature, which has no ``adapter_names``. Examples without the column raise KeyError.
    """

    def __init__(self, collator: Callable | None = None, column: str = ADAPTER_NAMES):
        if collator is None:
            from transformers import default_data_collator

            collator = default_data_collator
        self.collator = collator
        self.column = column

    def __call__(self, features: list[dict]) -> dict:
        missing = [i for i, feature in enumerate(features) if self.column not in feature]
        if missing:
            raise KeyError(
                f"AdapterNamesCollator: example {missing[0]} of the batch has no {self.column!r} entry "
                "(one adapter name per example is expected)"
            )
        names = [feature[self.column] for feature in features]
        rest = [{k: v for k, v in feature.items() if k != self.column} for feature in features]
        batch = dict(self.collator(rest))
        batch[ADAPTER_NAMES] = names
        return batch
