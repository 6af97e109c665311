"""Checking prefix-tuning adapter files (PEFT's ``PREFIX_TUNING``) before PEFT loads them, without PEFT.

PEFT saves a prefix adapter's encoder output, ``prompt_embeddings`` ``[num_virtual_tokens, num_layers * 2 *
token_dim]`` (the projection folded in), and its config with ``num_layers``, ``token_dim`` and
``num_attention_heads`` filled in from the model it was trained on. A file of another width, one trained
for another model, or one holding NaN / Inf surfaces in PEFT as a low-level error after the adapter was
added (or as NaN outputs). :func:`check_prefix_adapter_files` reads the local files first and raises
:class:`~fastprompt.prompted_embeds.adapter_files.AdapterFileError` naming the file and the field.
"""

from __future__ import annotations

import json
import os

import torch

from .adapter_files import (
    PROMPT_KEY,
    AdapterFileError,
    adapter_dir_of,
    check_finite,
    local_files,
    stored_table,
)
from .config import CONFIG_NAME

PREFIX_TUNING = "PREFIX_TUNING"
LAYOUT_FIELDS = ("num_layers", "token_dim", "num_attention_heads")


def read_prefix_config(model_id, subfolder: str | None = None) -> dict | None:
    """The local adapter_config.json as a dict if it is a prefix-tuning adapter's, else None."""
    path = adapter_dir_of(model_id, subfolder) if isinstance(model_id, (str, os.PathLike)) else None
    if path is None or not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return None
    try:
        with open(os.path.join(path, CONFIG_NAME)) as file:
            config = json.load(file)
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"Cannot read {os.path.join(path, CONFIG_NAME)}: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type") != PREFIX_TUNING:
        return None
    return config


def check_prefix_adapter_files(model_id, subfolder: str | None = None, expected: dict | None = None) -> None:
    """Raise :class:`AdapterFileError` if the local prefix-tuning adapter at ``model_id`` cannot load.

    Args:
        model_id: a local directory (anything else, e.g. a Hub id, is left to PEFT).
        subfolder: as in ``PeftModel.from_pretrained``.
        expected: ``num_layers`` / ``token_dim`` / ``num_attention_heads`` of the model it is loaded into
            (what PEFT fills in for it; None: not checked).

    Checked: the config's ``num_virtual_tokens`` and layout fields are positive ints, they equal
    ``expected``, ``prompt_embeddings`` is ``[num_virtual_tokens, num_layers * 2 * token_dim]`` and every
    value is finite.
    """
    config = read_prefix_config(model_id, subfolder)
    if config is None:
        return
    files = local_files(adapter_dir_of(model_id, subfolder))
    config_file = files.file(CONFIG_NAME)
    numbers = {}
    for field in ("num_virtual_tokens", *LAYOUT_FIELDS):
        value = config.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise AdapterFileError(f"{config_file} has {field}={value!r}, expected a positive int.")
        numbers[field] = value
    for field, want in (expected or {}).items():
        if want is not None and numbers.get(field) != want:
            raise AdapterFileError(
                f"{config_file} has {field}={numbers.get(field)}, but the model it is loaded into needs "
                f"{field}={want}: this prefix adapter was trained for another model."
            )
    weights_file, table, _ = stored_table(files)
    if not isinstance(table, torch.Tensor):
        raise AdapterFileError(f"{weights_file}: '{PROMPT_KEY}' is a {type(table).__name__}, not a tensor.")
    width = numbers["num_layers"] * 2 * numbers["token_dim"]
    want = (numbers["num_virtual_tokens"], width)
    if tuple(table.shape) != want:
        raise AdapterFileError(
            f"{weights_file}: '{PROMPT_KEY}' has shape {list(table.shape)}, but the prefix adapter needs "
            f"[num_virtual_tokens, num_layers * 2 * token_dim] = {list(want)} (from {config_file})."
        )
    check_finite(weights_file, table)
