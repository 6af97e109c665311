"""Run the prompt, get its keys/values: the one step behind prompt-KV reuse and the shared prompt prefix.

In a decoder-only model the N virtual tokens come first and attend only to each other, so every layer's
hidden states, keys and values over them depend on nothing but the prompt rows and the base model. Both
features run the base model over the prompt rows alone (batch K = one row per adapter, positions
0..N-1, no mask) with a full-attention ``DynamicCache`` and keep its keys/values:

- generation (``prompt_kv``) without grad, stored across calls (``PromptKVStore``);
- a training or evaluation forward (``shared_prefix``) with grad, for one batch: the rows' tokens then
  run on top of these keys/values and every row's gradient flows back through the one prompt pass.

Generation keeps every layer's N keys/values (a full-attention ``DynamicCache``; a sliding-window layer of
the model's own cache would keep only the last window) and fills them into the cache ``generate`` makes
(:func:`fill_prefix_cache`), whose layers apply their own window, exactly as if the prompt had been part of
the same forward.

A training forward runs the prompt into the model's own cache (``DynamicCache(config=...)``: whatever
layers the model's config asks for) and hands that cache to the token pass, expanded over the rows by the
layers' own batch methods (:func:`expand_prefix`): nothing here knows a layer's layout. Whether the token
pass then read every layer that holds the prompt is checked (:class:`PrefixReads`): a model that does not
hand its layers the cache (GPT-2 under gradient checkpointing, a model of its own making) is found out and
declined, never silently wrong.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
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
        cache: the cache the prompt ran into (batch K).
    """

    keys: list
    values: list
    output: object
    cache: object = None


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


def run_prompt(
    model, prompt_embeds: torch.Tensor, *, all_logits: bool = True, cache=None, **extra
) -> PromptPass:
    """Run ``model`` over ``prompt_embeds`` alone: positions 0..N-1, no mask, into ``cache`` (default: a
    full-attention ``DynamicCache``; :func:`model_cache` is the model's own).

    Args:
        model: the (decoder-only) base model, called as a module (its hooks run), or its decoder's own
            forward function (a decoder already being called: its hooks have run).
        prompt_embeds: [K, N, D] prompt rows in the model's dtype (with grad or not, as the caller runs).
        all_logits: keep the logits of all N positions (else only the last one, where the model can).
        cache: an empty cache to run into, or None.
        extra: further keywords of the call (``output_router_logits``).

    Returns:
        :class:`PromptPass` (``keys`` / ``values``: None for a layer the pass left empty).
    """
    from transformers import DynamicCache

    cache = DynamicCache() if cache is None else cache
    kwargs = {**extra, cache_argument(model): cache, "use_cache": True, "return_dict": True}
    forward = model.forward if isinstance(model, torch.nn.Module) else model
    if not all_logits and "logits_to_keep" in inspect.signature(forward).parameters:
        kwargs["logits_to_keep"] = 1
    output = model(inputs_embeds=prompt_embeds, **kwargs)
    keys = [getattr(layer, "keys", None) for layer in cache.layers]
    return PromptPass(keys, [getattr(layer, "values", None) for layer in cache.layers], output, cache)


def model_cache(base_model):
    """An empty cache of the layers the model's config asks for (``DynamicCache(config=...)``, as
    ``generate`` makes it): full, sliding-window, chunked, indexed... layers, each in its own layout."""
    from transformers import DynamicCache

    return DynamicCache(config=base_model.config)


# What building a model's cache from its config raises where the config does not describe one.
CACHE_BUILD_ERRORS = (AttributeError, TypeError, KeyError, ValueError, NotImplementedError)


def cache_layer_kinds(base_model) -> list[str]:
    """The class names of the layers of the model's own cache (:func:`model_cache`)."""
    return [type(layer).__name__ for layer in model_cache(base_model).layers]


def update_methods(layer) -> list[str]:
    """The names of a cache layer's methods that store new positions (``update``, ``update_*``)."""
    return [
        name
        for name in dir(type(layer))
        if (name == "update" or name.startswith("update_")) and callable(getattr(type(layer), name))
    ]


def holds_prompt(layer) -> bool:
    """Whether a cache layer holds something after the prompt pass: keys and values, or a recurrent
    layer's convolution or recurrent states (KV-shared layers stay empty; a placeholder layer,
    ``DummyLayer``, holds none)."""
    if carries_recurrent_state(layer):
        flags = ("is_conv_states_initialized", "is_recurrent_states_initialized")
        if any(any(getattr(layer, name, {}).values()) for name in flags):
            return True
    return bool(getattr(layer, "is_initialized", True)) and getattr(layer, "keys", None) is not None


def carries_recurrent_state(layer) -> bool:
    """Whether a cache layer keeps a convolution window or recurrent state (a hybrid's linear-attention or
    state-space layer, alone or beside keys/values): per-state dicts, ``conv_states`` / ``recurrent_states``,
    that its ``update_*`` methods overwrite in place."""
    return any(klass.__name__ == "LinearAttentionCacheLayerMixin" for klass in type(layer).__mro__)


def prefix_leaves(cache) -> tuple[list, list]:
    """Replace every tensor of the cache's layers that requires grad (an attribute, or a value of a
    per-state dict of a recurrent layer) by a detached leaf that requires grad (for reentrant
    checkpointing, whose recomputed layers see the cache's tensors as constants).

    Returns:
        ``(leaves, originals)``: the new leaves and the tensors they replace, in the same order.
    """
    leaves, originals = [], []

    def leaf_of(value):
        if not (torch.is_tensor(value) and value.requires_grad):
            return value
        leaf = value.detach().requires_grad_(True)
        leaves.append(leaf)
        originals.append(value)
        return leaf

    for layer in cache.layers:
        for name, value in list(vars(layer).items()):
            if torch.is_tensor(value):
                setattr(layer, name, leaf_of(value))
            elif isinstance(value, dict) and any(torch.is_tensor(v) for v in value.values()):
                setattr(layer, name, {key: leaf_of(v) for key, v in value.items()})
    return leaves, originals


class LeafGradients(torch.autograd.Function):
    """Identity on a tensor every checkpointed layer's backward runs before (the input embeddings, ``[B,
    L, D]``); its backward returns, as the gradients of ``*tensors``, the gradients the layers accumulated
    into ``leaves`` (:func:`prefix_leaves`: detached copies of ``tensors`` that a reentrant checkpoint sees
    as inputs). ``what`` names the feature and its way out for the error when a leaf got no gradient."""

    @staticmethod
    def forward(ctx, first, leaves, what, *tensors):
        ctx.leaves, ctx.what = leaves, what
        return first.clone()

    @staticmethod
    def backward(ctx, grad):
        leaves, ctx.leaves = ctx.leaves, None
        if any(leaf.grad is None for leaf in leaves):
            raise RuntimeError(
                f"{ctx.what[0]} with use_reentrant=True gradient checkpointing: the cached keys/values got "
                "no gradient (torch.autograd.grad(..., inputs=...) does not accumulate them); use "
                f"loss.backward(), or {ctx.what[1]}."
            )
        return (grad, None, None, *(leaf.grad for leaf in leaves))


def expand_prefix(cache, index: torch.Tensor | None, rows: int) -> None:
    """Expand a batch-K prompt cache over ``rows`` batch rows in place, by each layer's own methods (each
    layer knows its layout: keys/values, indexer keys, convolution and recurrent states); differentiable.

    Key/value layers use their batch methods; a layer with recurrent state takes the rows by its
    ``reorder_cache`` (beam search's row selection, which covers every state it keeps, keys/values too,
    where its batch methods would expand only the keys/values of a hybrid layer).

    Args:
        index: ``[rows]`` int64, the prompt (of K) each row takes; None: K = 1, every row takes it.
    """
    if index is None and rows == 1:
        return
    for layer in cache.layers:
        if carries_recurrent_state(layer):
            device = getattr(layer, "device", None)
            rows_index = torch.zeros(rows, dtype=torch.long) if index is None else index
            layer.reorder_cache(rows_index.to(device) if device is not None else rows_index)
        elif index is None:
            layer.batch_repeat_interleave(rows)
        else:
            layer.batch_select_indices(index)


class PrefixReads:
    """Counts the token pass's reads of each cache layer that holds the prompt: calls of its ``update``
    methods (``update``, and any other ``update_*`` a layer has, such as an indexer's ``update_indexer``).

    With ``read_only`` (gradient checkpointing), those methods return what they would return and store
    nothing, so that a recomputed layer sees the same cache and does not append to it twice: the layer's
    own method runs on a shallow copy of the layer.
    """

    def __init__(self, cache, *, read_only: bool):
        self.layers = [i for i, layer in enumerate(cache.layers) if holds_prompt(layer)]
        self.counts = dict.fromkeys(self.layers, 0)
        for i in self.layers:
            layer = cache.layers[i]
            for name in update_methods(layer):
                setattr(layer, name, functools.partial(self._update, i, layer, name, read_only))

    def _update(self, i, layer, name, read_only, *args, **kwargs):
        self.counts[i] += 1
        target = copy.copy(layer) if read_only else layer
        if carries_recurrent_state(layer):
            _own_states(target)
        return getattr(type(layer), name)(target, *args, **kwargs)

    def complete(self) -> bool:
        """Whether every layer holding the prompt was read."""
        return all(self.counts[i] for i in self.layers)

    def unread_reason(self, model) -> str:
        """Which layers were not read, in words."""
        unread = [i for i in self.layers if not self.counts[i]]
        name = getattr(model, "__qualname__", None) or type(model).__name__
        return (
            f"{name} did not read the prompt's cache in layer(s) {unread} of {len(self.counts)}: its "
            "layers get no cache in this forward, or read it another way"
        )


def _own_states(layer) -> None:
    """Give a recurrent cache layer (or its shallow copy) dicts and state tensors of its own before an
    ``update_*`` call, which writes its states in place (``copy_``): the prompt's states stay as the
    prompt pass left them (autograd saved them; a checkpointed layer recomputes from them), and the copy
    of a read-only layer stores nothing into the cache."""
    for name, value in list(vars(layer).items()):
        if isinstance(value, dict):
            setattr(layer, name, {k: v.clone() if torch.is_tensor(v) else v for k, v in value.items()})


def has_recurrent_layers(base_model) -> bool:
    """Whether the model's own cache (:func:`model_cache`) has a layer with recurrent state (a hybrid or a
    state-space model): generation then starts from the prompt's whole cache state
    (:func:`prefix_state_layers`), not from its keys/values."""
    try:
        return any(carries_recurrent_state(layer) for layer in model_cache(base_model).layers)
    except CACHE_BUILD_ERRORS:
        return False


def starts_from_own_cache(base_model) -> bool:
    """Whether generation starts from the model's own cache after the prompt (:func:`prefix_state_layers`)
    rather than from keys/values filled into the cache ``generate`` makes (:func:`fill_prefix_cache`): a
    cache with layers other than plain key/value ones (recurrent layers; placeholders of KV-shared or
    MLP-only layers), which only the model's own forward fills right."""
    try:
        layers = model_cache(base_model).layers
    except CACHE_BUILD_ERRORS:
        return False
    return any(type(layer).__name__ not in LAYER_TYPES for layer in layers)


def prefix_state_layers(caches: list, index: torch.Tensor | None, rows: int) -> list:
    """The layers of a generation cache that starts from the prompts' whole state: copies of the layers
    of ``caches`` (K prompt caches of batch 1, each the model's own cache after one prompt pass), joined
    over the batch (every state tensor of a layer is batch-first, as its ``reorder_cache`` has it) and
    taken per row (:func:`expand_prefix`). The stored caches are never written to.

    Args:
        index: ``[rows]`` int64, the prompt (of K) each row takes; None: K = 1, every row takes it.
    """
    layers = []
    for stored in zip(*(cache.layers for cache in caches), strict=True):
        layer = copy.deepcopy(stored[0])
        if len(stored) > 1:
            for name, value in vars(stored[0]).items():
                if torch.is_tensor(value):
                    setattr(layer, name, torch.cat([vars(other)[name] for other in stored]))
                elif isinstance(value, dict) and any(torch.is_tensor(v) for v in value.values()):
                    joined = {
                        key: _join(name, key, stored) if torch.is_tensor(v) else v for key, v in value.items()
                    }
                    setattr(layer, name, joined)
        layers.append(layer)
    expand_prefix(_Layers(layers), index, rows)
    return layers


def _join(name: str, key, layers: tuple) -> torch.Tensor:
    """The state tensor ``name[key]`` of each of ``layers``, joined over the batch."""
    return torch.cat([vars(layer)[name][key] for layer in layers])


@dataclasses.dataclass
class _Layers:
    """A cache's layers alone, for :func:`expand_prefix`."""

    layers: list


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
