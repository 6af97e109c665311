"""PEFT soft-prompt adapter directories written without PEFT, and the ways such files go bad.

``save_prompt_adapter(directory, table)`` writes what ``PeftModel.save_pretrained`` writes for a
prompt-tuning adapter: ``adapter_config.json`` and ``adapter_model.safetensors`` (or the older
``adapter_model.bin``) holding ``prompt_embeddings``; ``save_ptuning_adapter`` and
``save_multitask_adapter`` the same for P-tuning (the encoder's final rows) and multitask prompt tuning
(the shared table and the task factors), for the serving tests' venv, which has no PEFT.
``corrupt_adapter(directory, how)`` damages a saved adapter in one of the ways of ``BAD_FILES`` (the PEFT
integration's tests and the serving tests share them); ``SERVING_BAD_FILES`` adds the cases only a
PEFT-free reader sees (another PEFT type, a broken or missing config), ``TASK_FACTOR_BAD_FILES`` those of
a multitask adapter's task factors. Damage keeps the file's other tensors (P-tuning's and multitask's files
are damaged the same way).
"""

from __future__ import annotations

import json
import os

import torch

from ..prompted_embeds.adapter_files import BIN_NAME, PROMPT_KEY, SAFETENSORS_NAME
from ..prompted_embeds.config import CONFIG_NAME, MULTITASK_PROMPT_TUNING, P_TUNING, PromptTuningConfig

BAD_FILES = [
    "truncated",
    "garbage",
    "missing_key",
    "wrong_shape",
    "wrong_dim",
    "no_weights",
    "nan",
    "inf",
    "nan_bin",
]
SERVING_BAD_FILES = [*BAD_FILES, "lora_config", "broken_config", "no_config"]
# What only a multitask adapter's file can get wrong: its task factors missing, misshapen or not finite.
TASK_FACTOR_BAD_FILES = [
    "no_task_rows",
    "task_cols_shape",
    "task_rows_nan",
    "num_tasks_config",
    "num_ranks_config",
]

# Model names a client could send to leave a served adapter directory, or to slip past its name rule:
# each must be unknown (a 404), whatever lies behind it. The last two exist only in a tree that
# ``add_escaping_links`` prepared.
ESCAPING_NAMES = [
    "..",
    "../outside",
    "../../etc/passwd",
    "sub/alpha",
    "alpha/",
    "/etc/passwd",
    "%2e%2e",
    "%2e%2e%2foutside",
    "..%2foutside",
    "",
    ".",
    ".hidden",
    "-dash",
    "alpha\x00",
    "al\x00pha",
    "alpha\n",
    "..\\outside",
    "\uff41\uff4c\uff50\uff48\uff41",  # fullwidth "alpha": not ASCII
    "a" * 129,  # one over the longest name
    "link_out",
    "file_link_out",
]


def add_escaping_links(root, outside) -> None:
    """In adapter directory ``root``: ``link_out``, a symlink to the adapter directory ``outside`` (not in
    ``root``), and ``file_link_out``, a directory with ``outside``'s config whose weights file is a symlink
    to ``outside``'s; and ``.hidden``, a copy of ``outside`` (hidden names are never served)."""
    import shutil

    os.symlink(outside, os.path.join(root, "link_out"))
    os.makedirs(os.path.join(root, "file_link_out"))
    shutil.copy(os.path.join(outside, CONFIG_NAME), os.path.join(root, "file_link_out", CONFIG_NAME))
    os.symlink(os.path.join(outside, SAFETENSORS_NAME), os.path.join(root, "file_link_out", SAFETENSORS_NAME))
    shutil.copytree(outside, os.path.join(root, ".hidden"))


def save_prompt_adapter(directory, table: torch.Tensor, *, task_type: str = "CAUSAL_LM", bin: bool = False):
    """Write a prompt-tuning adapter for ``table`` ([N, D], any float dtype) into ``directory``, as PEFT
    does: config with ``num_virtual_tokens=N`` and ``token_dim=D``, weights under ``prompt_embeddings``.
    ``bin=True`` writes ``adapter_model.bin`` (``torch.save``) instead of the safetensors file."""
    from safetensors.torch import save_file

    rows, dim = table.shape
    config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=rows, token_dim=dim)
    config.inference_mode = True
    config.save_pretrained(directory)
    state = {PROMPT_KEY: table.detach().cpu().contiguous()}
    if bin:
        torch.save(state, os.path.join(directory, BIN_NAME))
    else:
        save_file(state, os.path.join(directory, SAFETENSORS_NAME), metadata={"format": "pt"})
    return directory


def _save_method_adapter(directory, config: dict, tensors: dict) -> None:
    """``adapter_config.json`` (``config``: the keys PEFT 0.21.2 writes for the method) and the safetensors
    file of ``tensors`` in ``directory``."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as file:
        json.dump(config, file, indent=2, sort_keys=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    save_file(tensors, os.path.join(directory, SAFETENSORS_NAME), metadata={"format": "pt"})


def _method_config(peft_type: str, rows: int, dim: int) -> dict:
    return {
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "modules_to_save": None,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": rows,
        "peft_type": peft_type,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": dim,
    }


def save_ptuning_adapter(directory, rows: torch.Tensor, *, encoder_hidden_size: int = 8):
    """Write what ``PeftModel.save_pretrained`` writes for a CAUSAL_LM P-tuning adapter (MLP encoder) whose
    encoder's output is ``rows`` ([N, D] float32): the config, and ``prompt_embeddings`` = ``rows`` (PEFT
    stores the encoder's final rows, not its weights)."""
    config = _method_config(P_TUNING, *rows.shape)
    config.update(
        encoder_dropout=0.0,
        encoder_hidden_size=encoder_hidden_size,
        encoder_num_layers=2,
        encoder_reparameterization_type="MLP",
    )
    _save_method_adapter(directory, config, {PROMPT_KEY: rows})
    return directory


def save_multitask_adapter(directory, shared: torch.Tensor, cols: torch.Tensor, task_rows: torch.Tensor):
    """Write what ``PeftModel.save_pretrained`` writes for a CAUSAL_LM multitask prompt-tuning adapter:
    ``prompt_embeddings`` ``shared`` [N, D], ``prefix_task_cols`` ``cols`` [T, N, R] and ``prefix_task_rows``
    ``task_rows`` [T, R, D] (float32). Task t's rows are ``shared * (cols[t] @ task_rows[t])``."""
    config = _method_config(MULTITASK_PROMPT_TUNING, *shared.shape)
    config.update(
        num_ranks=cols.shape[2],
        num_tasks=cols.shape[0],
        prompt_tuning_init="RANDOM",
        prompt_tuning_init_state_dict_path=None,
        prompt_tuning_init_task=0,
        prompt_tuning_init_text=None,
        tokenizer_kwargs=None,
        tokenizer_name_or_path=None,
    )
    tensors = {PROMPT_KEY: shared, "prefix_task_cols": cols, "prefix_task_rows": task_rows}
    _save_method_adapter(directory, config, tensors)
    return directory


def corrupt_adapter(directory, how: str) -> None:
    """Damage the adapter saved in ``directory`` (safetensors) in the way ``how`` names (see the lists)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, SAFETENSORS_NAME)
    config_path = os.path.join(directory, CONFIG_NAME)
    if how == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) - 40])
    elif how == "garbage":
        open(path, "wb").write(b"not a safetensors file at all")
    elif how == "missing_key":
        tensors = load_file(path)
        tensors["something_else"] = tensors.pop(PROMPT_KEY)
        save_file(tensors, path, metadata={"format": "pt"})
    elif how == "wrong_shape":
        tensors = load_file(path)
        save_file({**tensors, PROMPT_KEY: tensors[PROMPT_KEY][:2]}, path, metadata={"format": "pt"})
    elif how == "wrong_dim":
        config = json.load(open(config_path))
        dim = 2 * load_file(path)[PROMPT_KEY].shape[1]
        config["token_dim"] = dim
        json.dump(config, open(config_path, "w"))
        save_file({PROMPT_KEY: torch.zeros(3, dim)}, path, metadata={"format": "pt"})
    elif how == "no_weights":
        os.remove(path)
    elif how in ("nan", "inf", "nan_bin"):
        tensors = load_file(path)  # other tensors (a multitask adapter's task factors) kept
        table = tensors[PROMPT_KEY]
        table[1, 2] = float("nan") if how != "inf" else float("inf")
        table[0, 0] = float("-inf") if how != "nan" else float("nan")
        if how == "nan_bin":  # PEFT's other format: the pickle, read when there is no safetensors file
            os.remove(path)
            torch.save(tensors, os.path.join(directory, BIN_NAME))
        else:
            save_file(tensors, path, metadata={"format": "pt"})
    elif how in ("num_tasks_config", "num_ranks_config"):  # the config disagrees with the task factors
        config = json.load(open(config_path))
        key = how[: -len("_config")]
        config[key] += 1
        json.dump(config, open(config_path, "w"))
    elif how in TASK_FACTOR_BAD_FILES:
        tensors = load_file(path)
        if how == "no_task_rows":
            del tensors["prefix_task_rows"]
        elif how == "task_cols_shape":
            tensors["prefix_task_cols"] = tensors["prefix_task_cols"][:, :2].contiguous()
        else:
            tensors["prefix_task_rows"][0, 0, 0] = float("nan")
        save_file(tensors, path, metadata={"format": "pt"})
    elif how == "lora_config":
        config = json.load(open(config_path))
        config["peft_type"] = "LORA"
        json.dump(config, open(config_path, "w"))
    elif how == "broken_config":
        open(config_path, "w").write('{"peft_type": "PROMPT_TUNING", ')
    elif how == "no_config":
        os.remove(config_path)
    else:
        raise ValueError(f"how={how!r}: expected one of {SERVING_BAD_FILES + TASK_FACTOR_BAD_FILES}")
