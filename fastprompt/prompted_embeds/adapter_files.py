"""Reading and checking PEFT soft-prompt adapter files (prompt tuning, P-tuning, multitask prompt tuning),
without PEFT.

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

import io
import json
import os
from collections.abc import Callable
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
# The PEFT types whose files the PEFT integration checks before PEFT loads them: all hold
# ``prompt_embeddings`` [N * S, token_dim]; multitask adds its task factors (``TASK_KEYS``).
LOADABLE_TYPES = (PROMPT_TUNING, P_TUNING, MULTITASK_PROMPT_TUNING)


class AdapterFileError(ValueError, KeyError, RuntimeError):
    """A prompt-tuning adapter file that cannot be loaded (corrupt, truncated, missing key, wrong shape,
    NaN or Inf values).

    A ValueError; also a KeyError and a RuntimeError, the types PEFT raises for these cases, so existing
    ``except`` clauses keep working.
    """

    __str__ = BaseException.__str__


def adapter_dir_of(model_id, subfolder: str | None) -> str | None:
    path = os.path.join(model_id, subfolder) if subfolder else model_id
    return path if os.path.isdir(path) else None


def read_prompt_config(model_id, subfolder: str | None = None) -> dict | None:
    """The local adapter_config.json as a dict if it is an adapter of ``LOADABLE_TYPES`` (prompt tuning,
    P-tuning, multitask prompt tuning), else None."""
    path = adapter_dir_of(model_id, subfolder)
    if path is None or not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return None
    try:
        with open(os.path.join(path, CONFIG_NAME)) as file:
            config = json.load(file)
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"Cannot read {os.path.join(path, CONFIG_NAME)}: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type") not in LOADABLE_TYPES:
        return None
    return config


class AdapterFiles(NamedTuple):
    """Where one adapter's files are read from.

    ``where``: how messages name the adapter's directory (a path, or for a served directory of adapters
    only the adapter's name, so no server path reaches a client); ``read(name)``: the bytes of the file
    ``name`` in it, None when there is no such file (an ``OSError`` when it cannot be read).
    """

    where: str
    read: Callable[[str], bytes | None]

    def file(self, name: str) -> str:
        """How messages name the file ``name`` of this adapter."""
        return os.path.join(self.where, name)


def local_files(path) -> AdapterFiles:
    """The files of the adapter directory ``path``, read as they are (links followed)."""
    path = os.fspath(path)

    def read(name: str) -> bytes | None:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return None
        with open(file, "rb") as handle:
            return handle.read()

    return AdapterFiles(path, read)


def _read(files: AdapterFiles, name: str) -> bytes | None:
    try:
        return files.read(name)
    except OSError as exc:  # the message names the file as ``files`` does, not the OS's path
        raise AdapterFileError(f"Cannot read {files.file(name)}: {exc.strerror or exc}") from exc


def stored_table(files: AdapterFiles):
    """(file, the ``prompt_embeddings`` tensor, every stored tensor by name) from the safetensors file or
    the pickle, read once (a multitask adapter's task factors come from the same bytes)."""
    data = _read(files, SAFETENSORS_NAME)
    if data is not None:
        from safetensors.torch import load

        safetensors_file = files.file(SAFETENSORS_NAME)
        try:
            tensors = load(data)  # reads the data too: catches truncation past the header
        except Exception as exc:
            raise AdapterFileError(
                f"{safetensors_file} is not a readable safetensors file (corrupt or truncated): {exc}"
            ) from exc
        if PROMPT_KEY not in tensors:
            raise AdapterFileError(
                f"{safetensors_file} has no '{PROMPT_KEY}' tensor (keys: {sorted(tensors)}): "
                "it is not a soft-prompt (prompt tuning, P-tuning, multitask) adapter's weights file."
            )
        return safetensors_file, tensors[PROMPT_KEY], tensors
    data = _read(files, BIN_NAME)
    if data is not None:
        bin_file = files.file(BIN_NAME)
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterFileError(f"{bin_file} cannot be read (corrupt or truncated): {exc}") from exc
        if not isinstance(state, dict) or PROMPT_KEY not in state:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise AdapterFileError(f"{bin_file} has no '{PROMPT_KEY}' tensor (keys: {keys}).")
        return bin_file, state[PROMPT_KEY], state
    raise AdapterFileError(
        f"No adapter weights in {files.where}: expected {SAFETENSORS_NAME} (or {BIN_NAME}) next to "
        f"{CONFIG_NAME}."
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
    """Raise :class:`AdapterFileError` if the local soft-prompt adapter at ``model_id`` (prompt tuning,
    P-tuning, multitask prompt tuning) cannot load: its ``prompt_embeddings`` as below, and a multitask
    adapter's task factors (present, shapes that fit, finite).

    Args:
        model_id: a local directory (anything else, e.g. a Hub id, is left to PEFT).
        subfolder: as in ``PeftModel.from_pretrained``.
        model_dim: D, the hidden size of the model it is loaded into (None: not checked).
        existing_shape: the shape of the adapter's current table when loading into an existing adapter.
    """
    config = read_prompt_config(model_id, subfolder)
    if config is None:
        return
    files = local_files(adapter_dir_of(model_id, subfolder))
    weights_file, table, tensors = _checked_table(files, config, model_dim, existing_shape)
    if config.get("peft_type") == MULTITASK_PROMPT_TUNING:
        _checked_task_factors(weights_file, tensors, table, config, files.file(CONFIG_NAME))


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
    num_transformer_submodules, token_dim], and every value is finite. ``path`` may also be an
    :class:`AdapterFiles` (files read another way, named in messages as it says). ``peft_types``: the
    accepted ``peft_type`` values (``SERVABLE_TYPES`` adds P-tuning, whose file holds the encoder's final
    rows; multitask adapters: :func:`load_multitask_adapter`).

    Raises:
        AdapterFileError: naming the file and what is wrong with it.
    """
    return _load_adapter(path, model_dim, peft_types)[0]


def _load_adapter(path, model_dim: int | None, peft_types: tuple[str, ...]) -> tuple[PromptAdapter, dict]:
    """(:func:`load_prompt_adapter`'s result, every tensor of the weights file by name)."""
    if isinstance(path, AdapterFiles):
        files = path
    else:
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise AdapterFileError(f"Adapter directory {path} does not exist (or is not a directory).")
        files = local_files(path)
    config_file = files.file(CONFIG_NAME)
    data = _read(files, CONFIG_NAME)
    if data is None:
        raise AdapterFileError(
            f"No {CONFIG_NAME} in {files.where}: expected a PEFT prompt-tuning adapter saved with "
            "save_pretrained."
        )
    try:
        config = json.loads(data)
    except ValueError as exc:
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
    weights_file, table, tensors = _checked_table(files, config, model_dim, None)
    return PromptAdapter(table, config, weights_file), tensors


def _checked_table(files: AdapterFiles, config: dict, model_dim: int | None, existing_shape: tuple | None):
    """(weights file, table, every stored tensor) of the adapter in ``files`` whose config is ``config``,
    the table checked."""
    config_file = files.file(CONFIG_NAME)
    token_dim = config.get("token_dim")
    if model_dim is not None and token_dim is not None and token_dim != model_dim:
        raise AdapterFileError(
            f"{config_file} has token_dim={token_dim}, but the model's word embeddings have dimension "
            f"{model_dim}: this adapter was trained for another model."
        )
    weights_file, table, tensors = stored_table(files)
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
    check_finite(weights_file, table)
    return weights_file, table, tensors


def check_finite(weights_file: str, table: torch.Tensor) -> None:
    """Raise :class:`AdapterFileError` if the stored ``prompt_embeddings`` hold NaN or Inf."""
    not_finite = int((~torch.isfinite(table)).sum()) if table.is_floating_point() else 0
    if not_finite:
        raise AdapterFileError(
            f"{weights_file}: '{PROMPT_KEY}' holds {not_finite} of {table.numel()} values that are not "
            "finite (NaN or Inf): a prompt table like that makes every output NaN; not loaded, the model is "
            "left as it was."
        )


def _checked_task_factors(
    weights_file: str, tensors: dict, shared: torch.Tensor, config: dict, config_file: str
):
    """(prefix_task_cols [T, N*S, R], prefix_task_rows [T, R, D]) in float32 from a multitask adapter's
    stored ``tensors`` (read from ``weights_file``), checked against its ``prompt_embeddings`` ``shared``
    [N*S, D] and its config (``num_tasks`` = T, ``num_ranks`` = R, where given; PEFT builds the adapter
    from the config, then loads the file strictly): present, shapes that fit, finite."""
    missing = [key for key in TASK_KEYS if key not in tensors]
    if missing:
        raise AdapterFileError(f"{weights_file} has no {missing} tensor(s): not a multitask adapter's file.")
    cols, rows = tensors["prefix_task_cols"], tensors["prefix_task_rows"]
    if not (isinstance(cols, torch.Tensor) and isinstance(rows, torch.Tensor)):
        raise AdapterFileError(f"{weights_file}: the task factors are not tensors.")
    cols, rows = cols.float(), rows.float()
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
            f"{weights_file}: prefix_task_cols {list(cols.shape)} and prefix_task_rows "
            f"{list(rows.shape)} do not fit prompt_embeddings {list(shared.shape)} (expected [T, N*S, R] "
            "and [T, R, D])."
        )
    for key, got in (("num_tasks", cols.shape[0]), ("num_ranks", cols.shape[2])):
        want = config.get(key)
        if want is not None and want != got:
            raise AdapterFileError(
                f"{config_file} has {key}={want!r}, but the task factors in {weights_file} have {got} "
                f"(prefix_task_cols {list(cols.shape)} is [num_tasks, N*S, num_ranks])."
            )
    if not (torch.isfinite(cols).all() and torch.isfinite(rows).all()):
        raise AdapterFileError(f"{weights_file}: the task factors hold NaN or Inf values.")
    return cols, rows


def load_multitask_adapter(path, model_dim: int | None = None) -> PromptAdapter:
    """Read a PEFT multitask prompt-tuning adapter: its ``table`` is ``[num_tasks, N * S, token_dim]``, task
    t's rows ``prompt_embeddings * (prefix_task_cols[t] @ prefix_task_rows[t])`` in float32, exactly as
    PEFT's ``MultitaskPromptEmbedding`` computes them. Checked as :func:`load_prompt_adapter` checks a
    prompt-tuning adapter, plus the task factors' shapes and values.

    Raises:
        AdapterFileError: naming the file and what is wrong with it.
    """
    adapter, tensors = _load_adapter(path, model_dim, (MULTITASK_PROMPT_TUNING,))
    shared = adapter.table.float()
    files = path if isinstance(path, AdapterFiles) else local_files(os.fspath(path))
    config_file = files.file(CONFIG_NAME)
    cols, rows = _checked_task_factors(adapter.weights_file, tensors, shared, adapter.config, config_file)
    table = shared.unsqueeze(0) * torch.matmul(cols, rows)  # [T, N*S, D]
    return PromptAdapter(table, adapter.config, adapter.weights_file)
