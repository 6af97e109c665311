"""Reading and checking PEFT prompt-tuning adapter files, without PEFT.

Two users: serving (:func:`load_prompt_adapter` reads a saved adapter's table for an engine that never
imports PEFT) and the PEFT integration (:func:`check_prompt_adapter_files`, run before PEFT loads a
file, so a bad file leaves the model as it was).

PEFT adds the adapter (random weights) before it reads the weights file, and ``from_pretrained`` freezes
the base model before that; a truncated file, a missing ``prompt_embeddings`` key or a wrong shape then
surfaces as a low-level error with the model already changed. Both functions read the local
``adapter_config.json`` and the weights file first (the header and the table itself: its shape, and that
every value is finite) and raise :class:`AdapterFileError` with what is wrong and where.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch

from .config import CONFIG_NAME, MULTITASK_PROMPT_TUNING, P_TUNING, PROMPT_TUNING

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PROMPT_KEY = "prompt_embeddings"
TASK_KEYS = ("prefix_task_cols", "prefix_task_rows")  # multitask prompt tuning's task factors
# The PEFT types whose file holds the N (x S) rows to prepend as they are: prompt tuning's table and
# P-tuning's encoder output (PEFT saves ``get_prompt_embedding_to_save``, the encoder's final rows).
SERVABLE_TYPES = (PROMPT_TUNING, P_TUNING)


class AdapterFileError(ValueError, KeyError, RuntimeError):
    """A prompt-tuning adapter file that cannot be loaded (corrupt, truncated, missing key, wrong shape,
    NaN or Inf values).

    A ValueError; also a KeyError and a RuntimeError, the types PEFT raises for these cases, so existing
    ``except`` clauses keep working.
    """

    __str__ = BaseException.__str__


def _adapter_dir(model_id, subfolder: str | None) -> str | None:
    path = os.path.join(model_id, subfolder) if subfolder else model_id
    return path if os.path.isdir(path) else None


def read_prompt_config(model_id, subfolder: str | None = None) -> dict | None:
    """The local adapter_config.json as a dict if it is a PROMPT_TUNING adapter, else None."""
    path = _adapter_dir(model_id, subfolder)
    if path is None or not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return None
    try:
        with open(os.path.join(path, CONFIG_NAME)) as file:
            config = json.load(file)
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"Cannot read {os.path.join(path, CONFIG_NAME)}: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type") != PROMPT_TUNING:
        return None
    return config


def _stored_table(path: str):
    """(file, the ``prompt_embeddings`` tensor) from the safetensors file or the pickle."""
    safetensors_file = os.path.join(path, SAFETENSORS_NAME)
    bin_file = os.path.join(path, BIN_NAME)
    if os.path.isfile(safetensors_file):
        from safetensors import safe_open

        try:
            with safe_open(safetensors_file, framework="pt") as file:
                if PROMPT_KEY not in file.keys():
                    raise AdapterFileError(
                        f"{safetensors_file} has no '{PROMPT_KEY}' tensor (keys: {sorted(file.keys())}): "
                        "it is not a prompt-tuning adapter's weights file."
                    )
                table = file.get_tensor(PROMPT_KEY)  # reads the data: catches truncation past the header
        except AdapterFileError:
            raise
        except Exception as exc:
            raise AdapterFileError(
                f"{safetensors_file} is not a readable safetensors file (corrupt or truncated): {exc}"
            ) from exc
        return safetensors_file, table
    if os.path.isfile(bin_file):
        try:
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterFileError(f"{bin_file} cannot be read (corrupt or truncated): {exc}") from exc
        if not isinstance(state, dict) or PROMPT_KEY not in state:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise AdapterFileError(f"{bin_file} has no '{PROMPT_KEY}' tensor (keys: {keys}).")
        return bin_file, state[PROMPT_KEY]
    raise AdapterFileError(
        f"No adapter weights in {path}: expected {SAFETENSORS_NAME} (or {BIN_NAME}) next to {CONFIG_NAME}."
    )


def expected_rows(config: dict) -> int | None:
    """N * S of a prompt-tuning config dict (S defaults as PEFT: 2 for SEQ_2_SEQ_LM, else 1)."""
    num_virtual_tokens = config.get("num_virtual_tokens")
    if not isinstance(num_virtual_tokens, int):
        return None
    submodules = config.get("num_transformer_submodules")
    if submodules is None:
        submodules = 2 if config.get("task_type") == "SEQ_2_SEQ_LM" else 1
    return num_virtual_tokens * submodules


def check_prompt_adapter_files(
    model_id, subfolder: str | None = None, model_dim: int | None = None, existing_shape: tuple | None = None
) -> None:
    """Raise :class:`AdapterFileError` if the local prompt-tuning adapter at ``model_id`` cannot load.

    Args:
        model_id: a local directory (anything else, e.g. a Hub id, is left to PEFT).
        subfolder: as in ``PeftModel.from_pretrained``.
        model_dim: D, the hidden size of the model it is loaded into (None: not checked).
        existing_shape: the shape of the adapter's current table when loading into an existing adapter.
    """
    config = read_prompt_config(model_id, subfolder)
    if config is None:
        return
    _checked_table(_adapter_dir(model_id, subfolder), config, model_dim, existing_shape)


class PromptAdapter(NamedTuple):
    """A prompt-tuning adapter read from PEFT's files.

    ``table``: [num_virtual_tokens * num_transformer_submodules, token_dim], the dtype it was saved in
    (PEFT saves float32); ``config``: ``adapter_config.json`` as a dict; ``weights_file``: the file read.
    """

    table: torch.Tensor
    config: dict
    weights_file: str


def load_prompt_adapter(
    path, model_dim: int | None = None, peft_types: tuple[str, ...] = (PROMPT_TUNING,)
) -> PromptAdapter:
    """Read and check the PEFT prompt-tuning adapter saved in the directory ``path``.

    The directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or, from older PEFT,
    ``adapter_model.bin``), as ``PeftModel.save_pretrained`` writes them. Checked: the config is readable
    and its ``peft_type`` is ``PROMPT_TUNING``; ``token_dim`` equals ``model_dim`` (when given); the
    weights file is readable, has ``prompt_embeddings`` of shape [num_virtual_tokens *
    num_transformer_submodules, token_dim], and every value is finite. ``peft_types``: the accepted
    ``peft_type`` values (``SERVABLE_TYPES`` adds P-tuning, whose file holds the encoder's final rows;
    multitask adapters: :func:`load_multitask_adapter`).

    Raises:
        AdapterFileError: naming the file and what is wrong with it.
    """
    path = os.fspath(path)
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise AdapterFileError(f"Adapter directory {path} does not exist (or is not a directory).")
    if not os.path.isfile(config_file):
        raise AdapterFileError(
            f"No {CONFIG_NAME} in {path}: expected a PEFT prompt-tuning adapter saved with save_pretrained."
        )
    try:
        with open(config_file) as file:
            config = json.load(file)
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"Cannot read {config_file}: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_file} holds a {type(config).__name__}, not a JSON object.")
    if config.get("peft_type") not in peft_types:
        expected = " or ".join(repr(t) for t in peft_types)
        raise AdapterFileError(
            f"{config_file} has peft_type={config.get('peft_type')!r}, expected {expected}: only "
            "soft prompts whose file holds the rows to prepend can be served as prompt embeddings."
        )
    if expected_rows(config) is None:
        raise AdapterFileError(
            f"{config_file} has num_virtual_tokens={config.get('num_virtual_tokens')!r}, expected an int."
        )
    weights_file, table = _checked_table(path, config, model_dim, None)
    return PromptAdapter(table, config, weights_file)


def _checked_table(path: str, config: dict, model_dim: int | None, existing_shape: tuple | None):
    """(weights file, table) of the adapter in ``path`` whose config is ``config``, checked."""
    config_file = os.path.join(path, CONFIG_NAME)
    token_dim = config.get("token_dim")
    if model_dim is not None and token_dim is not None and token_dim != model_dim:
        raise AdapterFileError(
            f"{config_file} has token_dim={token_dim}, but the model's word embeddings have dimension "
            f"{model_dim}: this adapter was trained for another model."
        )
    weights_file, table = _stored_table(path)
    if not isinstance(table, torch.Tensor):
        raise AdapterFileError(f"{weights_file}: '{PROMPT_KEY}' is a {type(table).__name__}, not a tensor.")
    shape = tuple(table.shape)
    rows = expected_rows(config)
    dim = token_dim or model_dim
    expected = tuple(existing_shape) if existing_shape is not None else (rows, dim)
    mismatch = len(shape) != 2 or any(
        want is not None and got != want for got, want in zip(shape, expected, strict=True)
    )
    if mismatch:
        raise AdapterFileError(
            f"{weights_file}: '{PROMPT_KEY}' has shape {list(shape)}, but the adapter needs "
            f"[num_virtual_tokens * num_transformer_submodules, token_dim] = {list(expected)} "
            f"(from {config_file} and the model)."
        )
    not_finite = int((~torch.isfinite(table)).sum()) if table.is_floating_point() else 0
    if not_finite:
        raise AdapterFileError(
            f"{weights_file}: '{PROMPT_KEY}' holds {not_finite} of {table.numel()} values that are not "
            "finite (NaN or Inf): a prompt table like that makes every output NaN; not loaded, the model is "
            "left as it was."
        )
    return weights_file, table


def _stored_tensors(weights_file: str, keys: tuple[str, ...]) -> dict:
    """The tensors ``keys`` of the weights file (safetensors or pickle); AdapterFileError if one is
    missing."""
    if weights_file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(weights_file, framework="pt") as file:
            present = set(file.keys())
            tensors = {key: file.get_tensor(key) for key in keys if key in present}
    else:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
        tensors = {key: state[key] for key in keys if key in state}
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise AdapterFileError(f"{weights_file} has no {missing} tensor(s): not a multitask adapter's file.")
    return tensors


def load_multitask_adapter(path, model_dim: int | None = None) -> PromptAdapter:
    """Read a PEFT multitask prompt-tuning adapter: its ``table`` is ``[num_tasks, N * S, token_dim]``, task
    t's rows ``prompt_embeddings * (prefix_task_cols[t] @ prefix_task_rows[t])`` in float32, exactly as
    PEFT's ``MultitaskPromptEmbedding`` computes them. Checked as :func:`load_prompt_adapter` checks a
    prompt-tuning adapter, plus the task factors' shapes and values.

    Raises:
        AdapterFileError: naming the file and what is wrong with it.
    """
    adapter = load_prompt_adapter(path, model_dim, peft_types=(MULTITASK_PROMPT_TUNING,))
    shared = adapter.table.float()
    factors = _stored_tensors(adapter.weights_file, TASK_KEYS)
    cols, rows = factors["prefix_task_cols"].float(), factors["prefix_task_rows"].float()
    ok = (
        cols.dim() == 3
        and rows.dim() == 3
        and cols.shape[0] == rows.shape[0]
        and cols.shape[1] == shared.shape[0]
        and cols.shape[2] == rows.shape[1]
        and rows.shape[2] == shared.shape[1]
    )
    if not ok:
        raise AdapterFileError(
            f"{adapter.weights_file}: prefix_task_cols {list(cols.shape)} and prefix_task_rows "
            f"{list(rows.shape)} do not fit prompt_embeddings {list(shared.shape)} (expected [T, N*S, R] "
            "and [T, R, D])."
        )
    if not (torch.isfinite(cols).all() and torch.isfinite(rows).all()):
        raise AdapterFileError(f"{adapter.weights_file}: the task factors hold NaN or Inf values.")
    table = shared.unsqueeze(0) * torch.matmul(cols, rows)  # [T, N*S, D]
    return PromptAdapter(table, adapter.config, adapter.weights_file)
