"""Generation for PEFT prompt-tuning models, with ``prompt_concat``.

CausalLM: ``PeftModelForCausalLM.generate`` swaps the model's ``prepare_inputs_for_generation`` for the
PEFT model's; :func:`causal_lm_prepare_inputs_for_generation` is that method for prompt tuning. It injects
the prompts (``inputs_embeds`` = prompts + tokens) only while the KV cache is absent or empty and feeds
only the last token once the cache holds the prefix. transformers 5.24 renamed the cache argument
(``past_key_values`` -> ``cache``); PEFT 0.21.2 reads only the old name and so re-inserts the prompts at
every step. Here both names are read, so the result is right on either side of the rename.

Seq2Seq: :func:`seq2seq_generate` is ``PeftModelForSeq2SeqLM.generate`` for prompt tuning: the encoder's
``inputs_embeds`` are built once (N prompt rows + tokens) and the base model's ``generate`` does the rest.
"""

from __future__ import annotations

import copy
import warnings

import torch

from .adapter_batches import pop_adapter_names, rows_for_adapters
from .prompted_embeds import model_inputs_embeds

CACHE_KEYS = ("cache", "past_key_values")  # transformers >= 5.24, < 5.24


def _find_cache(model_kwargs: dict):
    for key in CACHE_KEYS:
        if model_kwargs.get(key, None) is not None:
            return model_kwargs[key]
    return None


def _cache_length(cache) -> int:
    if isinstance(cache, (tuple, list)):
        return cache[0][0].shape[-2]
    return cache.get_seq_length()


def _is_empty_cache(cache) -> bool:
    import transformers

    return isinstance(cache, transformers.Cache) and not cache.get_seq_length()


def _prefixed_generation_mask(peft_model, model_kwargs: dict, config, cache, is_prefill: bool) -> None:
    """Prefix the attention mask with N ones (2-D), or rebuild a 4-D mask, as PEFT does."""
    attention_mask = model_kwargs.get("attention_mask", None)
    if attention_mask is None:
        return
    if isinstance(attention_mask, dict):
        if len(attention_mask) != 1:
            raise ValueError(
                f"Expected a single attention mask, got {len(attention_mask)} instead, please open an "
                "issue (https://github.com/huggingface/peft/issues) and report the error."
            )
        attention_mask = next(iter(attention_mask.values()))
    input_ids = model_kwargs["input_ids"]
    prefix = torch.ones(input_ids.shape[0], config.num_virtual_tokens).to(input_ids.device)
    if attention_mask.dim() != 4:
        model_kwargs["attention_mask"] = torch.cat((prefix, attention_mask), dim=1)
        return
    from peft.utils.other import create_attention_mask

    batch_size = attention_mask.shape[0]
    total_seq_len = prefix.shape[1] + attention_mask.shape[2]
    mask_2d = torch.ones((batch_size, total_seq_len), dtype=attention_mask.dtype)
    if is_prefill:
        cache_position = torch.arange(total_seq_len, device=input_ids.device)
    else:
        cache_position = model_kwargs.get("cache_position", None)
    model_kwargs["attention_mask"] = create_attention_mask(
        peft_model.get_base_model(),
        model_input=None,
        attention_mask=mask_2d,
        past_key_values=cache,
        cache_position=cache_position,
        batch_size=batch_size,
        sequence_length=total_seq_len,
        position_ids=model_kwargs.get("position_ids", None),
    )


def causal_lm_prepare_inputs_for_generation(peft_model, args: tuple, kwargs: dict) -> dict:
    """``PeftModelForCausalLM.prepare_inputs_for_generation`` for prompt tuning (``task_ids`` removed)."""
    config = peft_model.active_peft_config
    model_kwargs = peft_model.base_model_prepare_inputs_for_generation(*args, **kwargs)
    cache = _find_cache(model_kwargs)
    cache_position = model_kwargs.get("cache_position", None)
    if cache_position is not None:
        is_prefill = bool(cache_position[0] == 0)
    else:
        is_prefill = cache is None or _is_empty_cache(cache)

    # Once the cache holds the prefix (prompts + tokens so far), feed only the newest token.
    if cache is not None and _cache_length(cache) >= model_kwargs["input_ids"].shape[1]:
        model_kwargs["input_ids"] = model_kwargs["input_ids"][:, -1:]

    _prefixed_generation_mask(peft_model, model_kwargs, config, cache, is_prefill)
    peft_model._adjust_prompt_learning_kwargs(config, kwargs=model_kwargs)

    if cache is None or _is_empty_cache(cache):
        input_ids = model_kwargs["input_ids"]
        model_kwargs["inputs_embeds"] = model_inputs_embeds(peft_model, input_ids, config.num_virtual_tokens)
        model_kwargs["input_ids"] = None

    # The model derives cache_position from inputs_embeds (which now include the prompts).
    model_kwargs.pop("cache_position", None)
    return model_kwargs


def seq2seq_generate(peft_model, kwargs: dict):
    """``PeftModelForSeq2SeqLM.generate`` for prompt tuning; ``adapter_names`` (beyond PEFT) gives every
    batch row its own adapter's prompt in the encoder inputs."""
    config = peft_model.active_peft_config
    base_model = peft_model.base_model
    base_model.prepare_inputs_for_generation = peft_model.prepare_inputs_for_generation
    try:
        if "input_ids" not in kwargs:
            raise ValueError("input_ids must be provided for Peft model generation")
        peft_model._adjust_prompt_learning_kwargs(config, kwargs=kwargs)
        kwargs = copy.deepcopy(kwargs)
        if "encoder_outputs" in kwargs:
            del kwargs["encoder_outputs"]
            warnings.warn(
                "`encoder_outputs` should not be passed to `generate` when using prompt tuning. Ignoring it.",
                stacklevel=3,
            )
        input_ids = kwargs.pop("input_ids")
        kwargs.pop("task_ids", None)
        adapter_names = pop_adapter_names(kwargs)
        n, rows = config.num_virtual_tokens, None
        if adapter_names is not None:
            rows = rows_for_adapters(peft_model, adapter_names, input_ids.shape[0])
            n = rows.num_virtual_tokens
        kwargs["inputs_embeds"] = model_inputs_embeds(peft_model, input_ids, n, rows)
        if "attention_mask" in kwargs:
            prefix = torch.ones(input_ids.shape[0], n).to(kwargs["attention_mask"].device)
            kwargs["attention_mask"] = torch.cat((prefix, kwargs["attention_mask"]), dim=1)
        return base_model.generate(**kwargs)
    finally:
        base_model.prepare_inputs_for_generation = peft_model.base_model_prepare_inputs_for_generation
