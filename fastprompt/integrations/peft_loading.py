"""Loading soft-prompt adapters safely: PEFT's ``load_adapter`` / ``from_pretrained`` behind checks.

Prompt tuning, P-tuning and multitask prompt tuning (``adapter_files.LOADABLE_TYPES``): a local adapter's
files are checked first (``adapter_files``); an error after that (PEFT has already added the adapter, or
frozen the base model) is undone: the new adapter removed, an existing adapter's weights (every parameter
of its prompt module: the table, an encoder, the task factors) and every ``requires_grad`` flag restored.
The exception itself is re-raised unchanged.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch

from ..prompted_embeds.adapter_files import LOADABLE_TYPES, check_prompt_adapter_files, read_prompt_config
from ..prompted_embeds.prefix_adapter_files import (
    PREFIX_TUNING,
    check_prefix_adapter_files,
    read_prefix_config,
)
from .peft_methods import enabled, original_of
from .peft_prefix import expected_layout


def _model_dim(peft_model) -> int | None:
    embeddings = getattr(peft_model, "word_embeddings", None)
    weight = getattr(embeddings, "weight", None)
    return weight.shape[-1] if weight is not None and weight.dim() == 2 else None


def wrap_load_adapter(original):
    original = original_of(original)
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
        if not (enabled(self) and getattr(self, "_is_prompt_learning", False)):
            return original(self, *args, **kwargs)
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return original(self, *args, **kwargs)
        model_id = bound.arguments.get("model_id")
        adapter_name = bound.arguments.get("adapter_name")
        subfolder = bound.arguments.get("kwargs", {}).get("subfolder")
        existed = adapter_name in self.peft_config
        existing_shape = None
        snapshot = None
        if existed and adapter_name in getattr(self, "prompt_encoder", {}):
            module = self.prompt_encoder[adapter_name]
            existing_shape = tuple(module.embedding.weight.shape)
            snapshot = {key: value.detach().clone() for key, value in module.state_dict().items()}
        if isinstance(model_id, (str, bytes)) or hasattr(model_id, "__fspath__"):
            check_prompt_adapter_files(model_id, subfolder, _model_dim(self), existing_shape)
            check_prefix_adapter_files(model_id, subfolder, expected_layout(self.get_base_model()))
        active_before = self.active_adapter
        flags = [(param, param.requires_grad) for param in self.parameters()]
        try:
            return original(self, *args, **kwargs)
        except Exception:
            _roll_back_load(self, adapter_name, existed, snapshot, active_before)
            for param, flag in flags:
                param.requires_grad_(flag)
            raise

    load_adapter.__fastprompt_original__ = original
    return load_adapter


def _roll_back_load(peft_model, adapter_name, existed: bool, snapshot, active_before) -> None:
    """Undo what a failed ``load_adapter`` did to the model (best effort)."""
    if not existed and adapter_name in peft_model.peft_config:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_model.delete_adapter(adapter_name)  # also its modules_to_save copies
        except Exception:  # noqa: BLE001 - fall back to removing what PEFT added for prompt learning
            peft_model.peft_config.pop(adapter_name, None)
            if adapter_name in getattr(peft_model, "prompt_encoder", {}):
                del peft_model.prompt_encoder[adapter_name]
            getattr(peft_model, "prompt_tokens", {}).pop(adapter_name, None)
        finally:
            peft_model.active_adapter = active_before
    elif snapshot is not None and adapter_name in getattr(peft_model, "prompt_encoder", {}):
        state = peft_model.prompt_encoder[adapter_name].state_dict()
        with torch.no_grad():
            for key, value in snapshot.items():
                if key in state and state[key].shape == value.shape:
                    state[key].copy_(value)


def wrap_from_pretrained(original_classmethod):
    original = original_classmethod.__func__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def from_pretrained(cls, *args, **kwargs):
        try:
            bound = signature.bind(cls, *args, **kwargs)
        except TypeError:
            return original(cls, *args, **kwargs)
        model, model_id = bound.arguments.get("model"), bound.arguments.get("model_id")
        config = bound.arguments.get("config")
        subfolder = bound.arguments.get("kwargs", {}).get("subfolder")
        local = isinstance(model_id, (str, bytes)) or hasattr(model_id, "__fspath__")
        if config is None:
            is_prompt = local and (
                read_prompt_config(model_id, subfolder) is not None
                or read_prefix_config(model_id, subfolder) is not None
            )
        else:
            is_prompt = getattr(config, "peft_type", None) in (*LOADABLE_TYPES, PREFIX_TUNING)
        if not (is_prompt and isinstance(model, torch.nn.Module)):
            return original(cls, *args, **kwargs)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        model_dim = weight.shape[-1] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
        if local:
            check_prompt_adapter_files(model_id, subfolder, model_dim)
            check_prefix_adapter_files(model_id, subfolder, expected_layout(model))
        flags = [(param, param.requires_grad) for param in model.parameters()]
        try:
            return original(cls, *args, **kwargs)
        except Exception:
            for param, flag in flags:
                param.requires_grad_(flag)
            raise

    from_pretrained.__fastprompt_original__ = original
    return classmethod(from_pretrained)
