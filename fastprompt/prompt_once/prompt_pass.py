"""Run the prompt, get its keys/values: the one step behind prompt-KV reuse and the shared prompt prefix.

In a decoder-only model the N virtual tokens come first and attend only to each other, so every layer's
hidden states, keys and values over them depend on nothing but the prompt rows and the base model. Both
features run the base model over the prompt rows alone (batch K = one row per adapter, positions
0..N-1, no mask) with a full-attention ``DynamicCache`` and keep its keys/values:

- generation (``prompt_kv``) without grad, stored across calls (``PromptKVStore``);
- a training or evaluation forward (``shared_prefix``) with grad, for one batch: the rows' tokens then
  run on top of these keys/values and every row's gradient flows back through the one prompt pass.

Every layer keeps all N keys/values (a sliding-window layer of the model's own cache would keep only the
last window); the cache the tokens run with applies its own window when it is filled
(:func:`fill_prefix_cache`), exactly as if the prompt had been part of the same forward.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

# Cache layer types whose ``update`` with N keys is what the model's own N-token forward does to them.
LAYER_TYPES = ("DynamicLayer", "DynamicSlidingWindowLayer", "StaticLayer", "StaticSlidingWindowLayer")


@dataclasses.dataclass
class PromptPass:
    """The base model run over K prompts of N rows.

    Attributes:
        keys, values: per decoder layer, ``[K, H_kv, N, head_dim]`` in the model's dtype.
        output: the base model's own output over the prompts (CausalLM: ``logits`` ``[K, N, V]``, or
            ``[K, 1, V]`` when only the last position was asked for).
    """

    keys: list
    values: list
    output: object


# A class's forward function -> its cache argument's name: inspect.signature costs tens of microseconds a
# call. Only class functions (a bounded set) are kept; a plain dict, not a WeakKeyDictionary or an
# lru_cache, which dynamo cannot trace through (or warns on).
_CACHE_ARGUMENT: dict = {}


def cache_argument(model) -> str:
    """The name a model's ``forward`` (a module, or a forward function itself) takes its cache under:
    ``cache`` (transformers >= 5.24) or ``past_key_values`` (before)."""
    forward = model.forward if isinstance(model, torch.nn.Module) else model
    function = type(model).forward if isinstance(model, torch.nn.Module) else None
    if function is not None and getattr(forward, "__func__", None) is function:
        name = _CACHE_ARGUMENT.get(function)
        if name is None:
            name = _CACHE_ARGUMENT[function] = _cache_argument_of(forward)
        return name
    return _cache_argument_of(forward)  # an instance's own forward (a wrapper): not kept


def _cache_argument_of(forward) -> str:
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def run_prompt(model, prompt_embeds: torch.Tensor, *, all_logits: bool = True) -> PromptPass:
    """Run ``model`` over ``prompt_embeds`` alone: positions 0..N-1, no mask, a full-attention cache.

    Args:
        model: the (decoder-only) base model, called as a module (its hooks run), or its decoder's own
            forward function (a decoder already being called: its hooks have run).
        prompt_embeds: [K, N, D] prompt rows in the model's dtype (with grad or not, as the caller runs).
        all_logits: keep the logits of all N positions (else only the last one, where the model can).

    Returns:
        :class:`PromptPass`.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    kwargs = {cache_argument(model): cache, "use_cache": True, "return_dict": True}
    forward = model.forward if isinstance(model, torch.nn.Module) else model
    if not all_logits and "logits_to_keep" in inspect.signature(forward).parameters:
        kwargs["logits_to_keep"] = 1
    output = model(inputs_embeds=prompt_embeds, **kwargs)
    keys = [layer.keys for layer in cache.layers]
    return PromptPass(keys, [layer.values for layer in cache.layers], output)


def fill_prefix_cache(cache, keys: list, values: list, index: torch.Tensor | None, rows: int) -> None:
    """Write the prompt keys/values into an empty ``cache`` for ``rows`` batch rows, layer by layer.

    ``cache.update(keys, values, layer)`` with the N prompt positions does to each layer (full,
    sliding-window, static) exactly what the model's own forward over them would: the sliding layers
    keep their window and count N tokens seen. The given tensors are never written to.

    Args:
        keys, values: per layer ``[K, H_kv, N, head_dim]``.
        index: ``[rows]`` int64, the prompt (of K) each row takes; None: K = 1, every row takes it.
        rows: the batch rows of the cache.

    Raises:
        RuntimeError: the cache is not empty, or its layers are not plain key/value layers.
    """
    if cache.get_seq_length():
        raise RuntimeError("the cache to put the prompt keys/values in is not empty.")
    layers = getattr(cache, "layers", None)
    if layers and (
        len(layers) != len(keys) or any(type(layer).__name__ not in LAYER_TYPES for layer in layers)
    ):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise RuntimeError(
            f"unsupported cache {type(cache).__name__} with layers {kinds} ({len(layers)} layers, the "
            f"prompt keys/values have {len(keys)})."
        )
    for layer_idx, (layer_keys, layer_values) in enumerate(zip(keys, values, strict=True)):
        if index is None:
            layer_keys = layer_keys.expand(rows, -1, -1, -1)
            layer_values = layer_values.expand(rows, -1, -1, -1)
        else:
            layer_keys = layer_keys.index_select(0, index.to(layer_keys.device))
            layer_values = layer_values.index_select(0, index.to(layer_values.device))
        cache.update(layer_keys, layer_values, layer_idx)
