"""Prefix tuning's keys/values as a cache prefix: put in the model's own cache once per adapter per batch.

Prefix tuning (Li & Liang; P-tuning v2) learns every layer's N keys and values directly. PEFT 0.21.2's
``get_prompt`` is the definition followed here:

- the prefix encoder's output, ``[N, num_layers * 2 * token_dim]`` (the embedding's rows, or the projection
  MLP over them with ``prefix_projection``; in inference mode the embedding's weight, which then holds the
  encoder's output), cast to the base model's dtype;
- laid out as ``[N, num_layers * 2, heads, head_dim]`` (``heads`` = the config's ``num_attention_heads``,
  which PEFT fills with the model's key/value heads, ``head_dim = token_dim // heads``): layer ``i``'s keys
  are slot ``2 i``, its values slot ``2 i + 1``, each transposed to ``[heads, N, head_dim]``. No rotary
  embedding, no model pass;
- the base model then runs the tokens on a cache holding them, with ``attention_mask = [ones(B, N), mask]``
  (token positions start at N).

Here the encoder runs once per adapter (PEFT runs it once per batch row) and its keys/values are written
into the model's own cache (``DynamicCache(config=...)``: full, sliding-window, chunked layers, each keeping
what the model's own forward over N positions would keep), expanded over the adapter's rows. They never go
through the embedding concat and are never re-inserted at a decoding step: a cache that holds them is
extended by the model itself.

The token pass (:func:`run_on_prefix`, counted in ``policy.CALLS["prefix"]``) checks that the model read every
cache layer holding the prefix
(:class:`~fastprompt.prompt_once.prompt_pass.PrefixReads`) and keeps the cache readable under gradient
checkpointing (reentrant or not): a recomputed layer sees the same prefix and does not append again, and
with ``use_reentrant=True`` the prefix tensors' gradients are handed back by
:class:`.prompt_pass.LeafGradients`.

Nothing here imports PEFT: the functions take the prefix encoder module and the numbers of its config.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from . import prompt_pass
from .policy import (
    CACHE_MODULE,
    CALLS,
    KEY_VALUE_LAYER,
    RECURRENT_LAYER,
    checkpoint_flagged,
    checkpointed_layers,
    checkpointing_mode,
    decoder_of,
    text_config,
)
from .prompt_pass import CACHE_BUILD_ERRORS, LeafGradients

# What the error of a prefix with no gradient under reentrant checkpointing names (LeafGradients).
_PREFIX_WAY_OUT = ("prefix tuning", "use_reentrant=False")


class PrefixTuningError(ValueError):
    """Prefix tuning cannot run exactly on this model or call (the message says why)."""


@dataclasses.dataclass(frozen=True)
class PrefixShape:
    """The numbers of a prefix-tuning config that lay its encoder's output out.

    Attributes:
        num_virtual_tokens: N.
        num_layers: the layers the encoder provides keys/values for.
        heads: key/value heads per layer.
        head_dim: the width of one head (``token_dim // heads``).
    """

    num_virtual_tokens: int
    num_layers: int
    heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> PrefixShape:
        """From a prefix-tuning config (``num_virtual_tokens``, ``num_layers``, ``num_attention_heads``,
        ``token_dim``)."""
        heads = config.num_attention_heads
        return cls(config.num_virtual_tokens, config.num_layers, heads, config.token_dim // heads)

    @property
    def width(self) -> int:
        """The encoder's output width, ``num_layers * 2 * token_dim``."""
        return self.num_layers * 2 * self.heads * self.head_dim


def encoder_output(encoder, shape: PrefixShape, *, inference_mode: bool, dtype=None) -> torch.Tensor:
    """The prefix encoder's output for the N virtual tokens, once: ``[1, N, num_layers * 2 * token_dim]``.

    Args:
        encoder: PEFT's ``PrefixEncoder`` (``embedding``, and ``transform`` with ``prefix_projection``).
        inference_mode: the adapter's ``inference_mode`` (PEFT then takes the embedding's weight itself).
        dtype: the base model's dtype (None: as the encoder gives it).
    """
    weight = encoder.embedding.weight
    if inference_mode:
        rows = weight[: shape.num_virtual_tokens][None]
    else:
        tokens = torch.arange(shape.num_virtual_tokens, device=weight.device)[None]
        rows = encoder(tokens)
    if rows.shape[-1] != shape.width:
        raise PrefixTuningError(
            f"the prefix encoder gives {rows.shape[-1]} values per virtual token, the config asks for "
            f"num_layers * 2 * token_dim = {shape.width}"
        )
    return rows if dtype is None else rows.to(dtype)


def layer_keys_values(rows: torch.Tensor, shape: PrefixShape) -> tuple[list, list]:
    """Lay ``[K, N, num_layers * 2 * token_dim]`` out as each layer's keys and values (views).

    Returns:
        ``(keys, values)``: per layer ``[K, heads, N, head_dim]``.
    """
    k, n = rows.shape[:2]
    slots = rows.view(k, n, shape.num_layers * 2, shape.heads, shape.head_dim).permute(2, 0, 3, 1, 4)
    return list(slots[0::2]), list(slots[1::2])


def layer_kinds(base_model, cache=None) -> list[str]:
    """Per decoder layer: ``"attention"`` (a key/value layer of the model's own cache the prefix goes
    into), ``"shared"`` (a KV-shared layer: it reads an earlier layer's cache and never stores its own),
    or ``"recurrent"`` / ``"other"``. ``cache``: an empty cache of the model's own (None: built here). A
    cache without slots for the KV-shared layers (transformers 5.22's for Gemma 4 / 3n) gets them appended
    as ``"shared"``."""
    config = text_config(base_model)
    layers = (prompt_pass.model_cache(base_model) if cache is None else cache).layers
    shared = getattr(config, "num_kv_shared_layers", 0) or 0
    total = getattr(config, "num_hidden_layers", None)
    missing = shared if shared and total is not None and len(layers) == total - shared else 0
    first_shared = len(layers) + missing - shared
    kinds = []
    for i, layer in enumerate(layers):
        names = {klass.__name__ for klass in type(layer).__mro__}
        if RECURRENT_LAYER in names:
            kinds.append("recurrent")
        elif shared and i >= first_shared:
            kinds.append("shared")
        elif KEY_VALUE_LAYER in names and type(layer).__module__ == CACHE_MODULE:
            kinds.append("attention")
        else:
            kinds.append("other")
    return kinds + ["shared"] * missing


def unsupported_reason(base_model, shape: PrefixShape) -> str | None:
    """Why fastprompt cannot put this prefix into the model's cache exactly (None: it can)."""
    supports = getattr(base_model, "_supports_default_dynamic_cache", None)
    if callable(supports) and not supports():
        return f"{type(base_model).__name__} does not run on transformers' DynamicCache"
    try:
        kinds = layer_kinds(base_model)
    except CACHE_BUILD_ERRORS as error:
        return f"its cache cannot be built from its config ({type(error).__name__}: {error})"
    if "recurrent" in kinds:
        return (
            "it is a hybrid model: its cache layers "
            f"{[i for i, kind in enumerate(kinds) if kind == 'recurrent']} carry recurrent or convolution "
            "state, which a key/value prefix cannot enter"
        )
    if "other" in kinds:
        return "its cache layers are not transformers' attention key/value layers"
    if shape.num_layers != len(kinds):
        return (
            f"the adapter's num_layers={shape.num_layers} differs from the {len(kinds)} layers of the "
            "model's cache"
        )
    targets = layer_targets(base_model)
    if targets and all(heads > shape.heads or width > shape.head_dim for heads, width in targets):
        return (
            f"no layer's key/value shape fits the prefix (heads={shape.heads}, head_dim={shape.head_dim}; "
            f"the layers need {sorted(set(targets))}): set token_dim and num_attention_heads for a layer"
        )
    return None


def prefix_cache(base_model, keys: list, values: list, index: torch.Tensor | None, rows: int):
    """The model's own cache (``DynamicCache(config=...)``) holding the prefix for ``rows`` batch rows.

    Args:
        keys, values: per layer ``[K, heads, N, head_dim]``, one prompt per adapter (with grad or not).
        index: ``[rows]`` int64, the adapter (of K) each row takes; None: K = 1, every row takes it.
        rows: B.

    Each attention layer gets ``update(keys, values)`` with the N positions, as the model's own forward
    over them would do (a sliding-window layer keeps its window); KV-shared layers stay empty (they read
    their source layer). Differentiable in the keys/values. :func:`unsupported_reason` says first
    whether the model's cache can hold the prefix.
    """
    cache = prompt_pass.model_cache(base_model)
    kinds = layer_kinds(base_model, cache)
    targets = layer_targets(base_model)
    for i, (layer_keys, layer_values) in enumerate(zip(keys, values, strict=True)):
        if kinds[i] != "attention":
            continue
        fitted = _fitted(layer_keys, layer_values, targets[i] if targets else None)
        if fitted is not None:  # batch K: one prompt per adapter
            cache.update(*fitted, i)
    prompt_pass.expand_prefix(cache, index, rows)  # batch B, by the layers' own batch methods
    return cache


def layer_targets(base_model) -> list | None:
    """Per layer ``(key/value heads, head_dim)`` of a model whose layers differ (Gemma 4's
    ``per_layer_config``, or ``global_head_dim`` / ``num_global_key_value_heads``), else None: PEFT
    0.21.2's ``_get_layer_kv_target_shape``. PEFT provisions the prefix for the largest layer; each layer
    takes the leading heads and head width it needs, and a layer wider than the prefix gets none."""
    config = text_config(base_model)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return None
    try:
        per_layer = getattr(config, "per_layer_config", None)
        if per_layer is not None:
            layers = [per_layer[i] for i in range(len(layer_types))]
            return [(layer.num_key_value_heads, layer.head_dim) for layer in layers]
        global_head_dim = getattr(config, "global_head_dim", None)
        if global_head_dim is None:
            return None
        global_heads = getattr(config, "num_global_key_value_heads", None) or config.num_key_value_heads
        return [
            (config.num_key_value_heads, config.head_dim)
            if kind == "sliding_attention"
            else (global_heads, global_head_dim)
            for kind in layer_types
        ]
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


def _fitted(keys: torch.Tensor, values: torch.Tensor, target):
    """A layer's ``[K, heads, N, head_dim]`` keys/values cut to its ``target`` (heads, head_dim), or None
    where the layer is wider than the prefix (it gets no prefix, as in PEFT)."""
    if target is None:
        return keys, values
    heads, width = target
    if heads > keys.shape[1] or width > keys.shape[3]:
        return None
    return keys[:, :heads, :, :width], values[:, :heads, :, :width]


@contextlib.contextmanager
def _set_on_instances(modules, name: str, value):
    saved = [(module, name in module.__dict__, module.__dict__.get(name)) for module in modules]
    for module in modules:
        object.__setattr__(module, name, value)
    try:
        yield
    finally:
        for module, had, old in saved:
            if had:
                object.__setattr__(module, name, old)
            else:
                module.__dict__.pop(name, None)


@contextlib.contextmanager
def _hooked(module, register: str, hook):
    """While open, ``hook`` registered on ``module`` by its method ``register`` (none if no module)."""
    handle = None if module is None else getattr(module, register)(hook)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def run_on_prefix(base_model, call, cache, kwargs: dict):
    """Run the tokens on a cache holding the prefix: ``call(**kwargs, <cache argument>=cache)``.

    Args:
        base_model: the base model (its layers' gradient checkpointing is read).
        call: what runs the model (the base model, or PEFT's ``LoraModel``-style wrapper of it).
        cache: :func:`prefix_cache`'s cache, batch B.
        kwargs: the call's keywords (ids or embeddings, the mask ``[B, N + L]``, labels, ...).

    Raises:
        PrefixTuningError: the model ran its decoder and did not read every cache layer holding the prefix
            (a forward replaced by one that never runs the decoder is not checked: it reads nothing), or
            its layers are checkpointed in a way that drops the cache.
    """
    layers = checkpointed_layers(base_model) if torch.is_grad_enabled() else []
    mode, reason = checkpointing_mode(layers) if layers else (None, None)
    if reason is not None:
        raise PrefixTuningError(f"prefix tuning cannot run under this gradient checkpointing: {reason}")
    hook = contextlib.nullcontext()
    if mode == "reentrant":  # the recomputed layers see the cache's tensors as leaves
        leaves, originals = prompt_pass.prefix_leaves(cache)
        if leaves:
            embeddings = base_model.get_input_embeddings()

            def handed_back(module, args, out):
                return LeafGradients.apply(out, leaves, _PREFIX_WAY_OUT, *originals)

            hook = _hooked(embeddings, "register_forward_hook", handed_back)
    reads = prompt_pass.PrefixReads(cache, read_only=mode is not None)
    # only the layers the prefix went into (a KV-shared layer's DummyLayer counts as initialized)
    reads.layers = [i for i in reads.layers if getattr(cache.layers[i], "keys", None) is not None]
    kwargs = {**kwargs, prompt_pass.cache_argument(base_model): cache}
    readable, handed = contextlib.nullcontext(), contextlib.nullcontext()
    if mode is not None:  # a recomputed layer must see the same cache and not append to it again
        readable = _set_on_instances(layers, "_can_checkpoint_with_cache", True)
        # a model that hands its layers no cache while its flag is on (GPT-2): the layers checkpoint
        # themselves, so the flag of the modules around them can be off for this call
        layer_ids = {id(layer) for layer in layers}
        around = [m for m in checkpoint_flagged(base_model) if id(m) not in layer_ids]
        handed = _set_on_instances(around, "gradient_checkpointing", False)
    decoder = decoder_of(base_model)
    ran = []  # whether the decoder ran: a forward replaced by one that runs no layer reads nothing at all
    seen = _hooked(decoder, "register_forward_pre_hook", lambda module, args: ran.append(True))
    with hook, readable, handed, seen:
        output = call(**kwargs)
    if not reads.complete() and (decoder is None or ran):
        raise PrefixTuningError(
            f"prefix tuning needs the model to read its cache: {reads.unread_reason(base_model)}"
        )
    CALLS["prefix"] += 1
    return output
