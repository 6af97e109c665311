"""The base model's word-embedding table, read from its checkpoint files (not by loading the model).

A served request's ``prompt_embeds`` must hold exactly the rows the model's own embedding layer gives
for its tokens. :func:`read_word_table` finds the word-embedding parameter of the architecture (the
model is built on the ``meta`` device from its config: no memory, no weights), reads that one tensor
from the safetensors (or ``.bin``) checkpoint, indexed or not, and reproduces the embedding module on
the CPU in the serving dtype, scale included (Gemma's scaled embeddings: ``lookup_spec``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..prompted_embeds.word_embeddings import lookup_spec

_CHECKPOINTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


@dataclass(frozen=True)
class WordTable:
    """What ``prompt_concat`` needs to reproduce the model's embedding layer.

    ``weight``: [V, D] on the CPU, in the serving dtype; ``embed_scale``: the factor the model multiplies
    token rows by (a float, a 0-d tensor, or None); ``padding_idx``: the embedding's padding index;
    ``source``: ``FILE:KEY`` the table was read from.
    """

    weight: torch.Tensor
    embed_scale: float | torch.Tensor | None
    padding_idx: int | None
    source: str

    @property
    def dim(self) -> int:
        """D, the hidden size."""
        return self.weight.shape[1]


def model_directory(model: str, revision: str | None = None) -> str:
    """The local directory of ``model`` (a directory, or a hub name already in the local cache or
    fetched by ``huggingface_hub``)."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import hf_hub_download

    return os.path.dirname(hf_hub_download(model, "config.json", revision=revision))


def _fetch(directory: str, name: str, model: str, revision: str | None) -> str | None:
    path = os.path.join(directory, name)
    if os.path.isfile(path) or os.path.isdir(model):
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(model, name, revision=revision)
    except EntryNotFoundError:
        return None


def _checkpoint_keys(directory: str, model: str, revision: str | None) -> dict[str, str]:
    """{tensor name: the file holding it} over the model's checkpoint (sharded or not)."""
    for index_name, single_name in _CHECKPOINTS:
        index = _fetch(directory, index_name, model, revision)
        if index is not None:
            with open(index) as file:
                weight_map = json.load(file)["weight_map"]
            return {key: os.path.join(os.path.dirname(index), name) for key, name in weight_map.items()}
        single = _fetch(directory, single_name, model, revision)
        if single is None:
            continue
        if single.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(single, framework="pt") as file:
                return dict.fromkeys(file.keys(), single)
        state = torch.load(single, map_location="meta", weights_only=True, mmap=True)
        return dict.fromkeys(state, single)
    raise ValueError(
        f"No checkpoint in {directory}: expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json."
    )


def _checkpoint_key(parameter: str, keys) -> str | None:
    """The checkpoint key of model parameter ``parameter`` (exactly, or with a prefix added or dropped,
    as a base model saved without its head's prefix: ``transformer.wte.weight`` / ``wte.weight``)."""
    if parameter in keys:
        return parameter
    matches = [key for key in keys if key.endswith("." + parameter) or parameter.endswith("." + key)]
    return matches[0] if len(matches) == 1 else None


def _read_tensor(path: str, key: str) -> torch.Tensor:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as file:
            return file.get_tensor(key)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)[key]


def read_word_table(
    model: str, dtype: torch.dtype, *, revision: str | None = None, trust_remote_code: bool = False
) -> WordTable:
    """The word-embedding table of the causal LM ``model`` (a local directory or a hub name), in ``dtype``.

    Args:
        model: what vLLM was given as ``model``.
        dtype: the dtype vLLM runs the model in (its ``model_config.dtype``), so the rows equal the rows
            the model's embedding layer gives.
    Raises:
        ValueError: no checkpoint, no word-embedding tensor of the expected shape in it, or an embedding
            layer whose output the fused op cannot reproduce.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = model_directory(model, revision)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    embedding = skeleton.get_input_embeddings()
    parameter = next(name for name, p in skeleton.named_parameters() if p is embedding.weight)
    keys = _checkpoint_keys(directory, model, revision)
    key = _checkpoint_key(parameter, keys)
    if key is None:
        raise ValueError(
            f"The checkpoint of {model} has no tensor for the word embeddings '{parameter}' of "
            f"{type(skeleton).__name__} (its keys include: {sorted(keys)[:8]})."
        )
    table = _read_tensor(keys[key], key)
    if tuple(table.shape) != tuple(embedding.weight.shape):
        raise ValueError(
            f"{keys[key]}: '{key}' has shape {list(table.shape)}, but {type(skeleton).__name__}'s word "
            f"embeddings are {list(embedding.weight.shape)} (vocab_size, hidden_size from the config)."
        )
    embedding = embedding.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        embedding.weight.copy_(table)
        scalar = getattr(embedding, "scalar_embed_scale", None)
        if isinstance(getattr(embedding, "embed_scale", None), torch.Tensor) and scalar is not None:
            embedding.embed_scale.fill_(scalar)  # a non-persistent buffer: not in the checkpoint
    embedding.weight.requires_grad_(False)
    spec = lookup_spec(embedding)
    if spec is None:
        raise ValueError(
            f"The word embeddings of {type(skeleton).__name__} ({type(embedding).__name__}) are not a plain "
            "(optionally scaled) lookup: fastprompt cannot build prompt embeddings equal to its rows."
        )
    return WordTable(spec.weight.detach(), spec.embed_scale, spec.padding_idx, f"{keys[key]}:{key}")
