"""``share_prompt_prefix`` (beyond PEFT), the policy: whether a forward runs the prompt once per adapter.

In a decoder-only model the N virtual tokens come first and attend only to each other, so their hidden
states, keys and values in every layer are the same for every batch row that uses the same adapter. PEFT
runs them B times; :mod:`fastprompt.prompt_once.shared_forward` runs them once per adapter and the rows'
tokens on top of their keys/values.

This module decides when: only where it is exact (:func:`why_not_share` says why not otherwise) and, for
the default ``None``, where it pays (:func:`sharing_pays`, a position-count rule). It holds the defaults
(the model's, then ``patch_peft``'s) and ``CALLS``, and inspects gradient checkpointing for both modules.

Exactness is decided from what the model does, never from a list of model names that may share:

- the task and the call: a decoder-only model, a forward that takes a cache, no per-layer outputs, no
  cache passed in, no dropout active in training, a router auxiliary loss only where the family's own
  loss function can be given the prompt's router logits once per row (:mod:`.router_loss`);
- the model's own cache (``DynamicCache(config=...)``): every layer one of transformers' attention
  key/value layers (full, sliding-window, chunked) or recurrent-state layers (a hybrid's or a state-space
  model's convolution window and recurrent state after the prompt); the prompt pass fills it and the
  layers' own methods expand it over the rows;
- the attention implementation: one that applies a padding mask over a cached prefix;
- gradient checkpointing that keeps the cache readable by the layers;
- at run time (:mod:`.prompt_pass`): the token pass must read every cache layer that holds the prompt. A
  model that does not (GPT-2 hands its blocks no cache under gradient checkpointing; a model of its own
  making) is declined from then on (``OBSERVED``), and that forward takes PEFT's path.

``DENIED`` lists the model types a test shows inexact despite those checks, each with its reason.
"""

from __future__ import annotations

import collections
import functools
import inspect
import warnings
import weakref

import torch

from .prompt_pass import CACHE_BUILD_ERRORS, cache_argument

SHARE_PROMPT_PREFIX = "share_prompt_prefix"
DEFAULT_ATTRIBUTE = "_fastprompt_share_prompt_prefix"

# Model families a test shows inexact on a path where every check below passes: model type -> {path:
# the reason}, paths "share" (the shared forward), "packed" (the shared and inserted layouts of packed
# rows, which then run unpacked) and "generate" (generation's prompt-KV reuse). Each shown by
# tests/test_model_matrix.py (the family's row there). A model matches by its config's model_type or by a
# class of that family's modeling module in its class hierarchy (a subclass registered under another name).
DENIED: dict[str, dict[str, str]] = {
    "gpt_neo": {
        "packed": "its local attention layers apply their window from a causal buffer indexed by the slot in "
        "the row, outside the mask functions",
    },
    # State-space mixers whose forward over several tokens does not continue from a cached state: the
    # prompt's state cannot carry the rows' tokens (training and generation's prefill alike).
    **{
        model_type: dict.fromkeys(
            ("share", "generate"),
            "its Mamba mixer treats a cached forward as one decoding step: several tokens cannot continue "
            "from the prompt's state (its padding mask is not cut to the new positions)",
        )
        for model_type in ("mamba", "falcon_mamba")
    },
    "jamba": dict.fromkeys(
        ("share", "generate"),
        "its Mamba mixer's scan over several tokens starts from a zero state, not from the cached one",
    ),
    "bamba": dict.fromkeys(
        ("share", "generate"),
        "its Mamba-2 chunked scan over several tokens from a cached state differs from one pass (logits "
        "5e-3 relative, measured)",
    ),
    "recurrent_gemma": dict.fromkeys(
        ("share", "generate", "packed"),
        "its recurrent blocks run from a cached state, or over several documents of a row, unlike one "
        "pass (logits 4e-2 relative, measured)",
    ),
    "moshi": dict.fromkeys(
        ("share", "generate"),
        "its forward over tokens after a cached prompt differs from one pass (logits 3e-1 relative, "
        "measured)",
    ),
    "llama4_text": {
        "packed": "its attention temperature tuning scales the queries by the slot in the row "
        "(cache_position), not by each document's own position",
    },
}
# What a model's own cache layer may be for the prompt to be shared: transformers' attention key/value
# layers (a base class name; sliding-window, chunked and indexed layers derive from it). A layer that
# also carries recurrent or convolution state (hybrids) derives from the second.
KEY_VALUE_LAYER = "DynamicLayer"
RECURRENT_LAYER = "LinearAttentionCacheLayerMixin"
# Either kind holds a prefix state that is the same for every row of an adapter: the prompt's keys and
# values, or its convolution window and recurrent state after N tokens (a hybrid's linear-attention or
# state-space layers), which the token pass continues from as one pass over N + L positions would.
# A placeholder layer (``DummyLayer``: a hybrid's MLP-only block) holds nothing and is passed over.
PREFIX_STATE_LAYERS = frozenset({KEY_VALUE_LAYER, RECURRENT_LAYER, "DummyLayer"})
# A key/value layer that also keeps a sparse-attention indexer's keys (DeepSeek-V3.2's DSA): its top-k
# selection ranks the keys one pass sees, so a prompt run apart selects other keys than PEFT's one pass.
INDEXED_LAYER = "DynamicIndexedLayer"
CACHE_MODULE = "transformers.cache_utils"  # where transformers' own layer classes live
# Attention implementations that apply a padding mask over a cached prefix as over the same positions in
# one pass (flash variants: transformers' own and the kernels hub's, whose names contain "flash").
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")
TASKS = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS")
# Keywords of the base model's forward that the shared forward passes on as PEFT's path would.
_PASSED_ON = frozenset(
    {
        "attention_mask",
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",
        "return_dict",
        "labels",
        "use_cache",
    }
)
LOSS_KEYWORDS = frozenset({"num_items_in_batch"})
CACHE_KEYWORDS = ("cache", "past_key_values")

# The cost rule of ``share_prompt_prefix=None``: share when the token positions run fall to at most this
# fraction of PEFT's B*(N+L), and at least this many positions are saved (a second model call costs a
# fixed overhead that small savings do not repay). Measured: bench/RESULTS.md.
MAX_POSITION_FRACTION = 0.9
MIN_SAVED_POSITIONS = 64

# Counts forwards that shared ("shared") and that took PEFT's path for a reason ("not shared"), for
# tests and diagnostics.
CALLS: collections.Counter = collections.Counter()

# What the run-time check found: model instance -> {checkpointed: why its token pass did not read the
# prompt's cache}. That model is declined from then on in that checkpointing state (one model only: an
# error of one call, a user's hook say, never switches sharing off for a whole class), with a warning.
OBSERVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Errors of a prompt pass that mean the model does not take transformers' cache (a model of its own
# making): the forward takes PEFT's path, never ends in them.
PROMPT_PASS_ERRORS = (AttributeError, TypeError, NotImplementedError, KeyError, IndexError, ValueError)
# Errors of a token pass that, where it also left a prompt-holding cache layer unread, mean the model's
# layers got no cache (their keys meet the mask of N + L positions): declined the same way.
TOKEN_PASS_ERRORS = (RuntimeError, ValueError, IndexError, TypeError, AttributeError)


class RuntimeDecline(Exception):
    """A shared forward found at run time that it cannot be exact (:data:`OBSERVED`); the caller takes
    PEFT's path (or raises ``ValueError`` for ``share_prompt_prefix=True``)."""


def record_decline(base_model, checkpointing_mode, reason: str) -> RuntimeDecline:
    """Remember that ``base_model`` cannot share in this checkpointing state, and why (with a warning:
    the model takes PEFT's path from then on)."""
    if checkpointing_mode is not None:
        reason = f"under gradient checkpointing, {reason}"
    reason = f"{reason} (model type {_base_model_type(base_model)!r})"
    OBSERVED.setdefault(base_model, {})[checkpointing_mode is not None] = reason
    message = f"share_prompt_prefix: this model takes PEFT's path from now on: {reason}."
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return RuntimeDecline(reason)


def observed_reason(base_model, checkpointed: bool) -> str | None:
    """What the run-time check found for ``base_model`` in this checkpointing state, or None."""
    return OBSERVED.get(base_model, {}).get(checkpointed)


def check_request(value) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"share_prompt_prefix must be True, False or None, got {value!r}")


_GLOBAL_DEFAULT = {"value": None}  # patch_peft(share_prompt_prefix=...)


def model_default(peft_model):
    """The model-wide ``share_prompt_prefix`` (``accelerate(model, share_prompt_prefix=...)``), else the
    global one (``patch_peft(share_prompt_prefix=...)``), else None."""
    return getattr(peft_model, DEFAULT_ATTRIBUTE, _GLOBAL_DEFAULT["value"])


def set_global_default(value) -> None:
    check_request(value)
    _GLOBAL_DEFAULT["value"] = value


def set_model_default(peft_model, value) -> None:
    check_request(value)
    object.__setattr__(peft_model, DEFAULT_ATTRIBUTE, value)


def text_config(model):
    """A model's text config (``config.get_text_config()`` where there is one, else its config)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _base_model_type(base_model) -> str | None:
    config = getattr(base_model, "config", None)
    return getattr(config, "model_type", None)


def denied_reason(base_model, path: str) -> str | None:
    """The reason ``DENIED`` gives for ``base_model`` on ``path`` (``"share"`` / ``"packed"`` /
    ``"generate"``), or None."""
    config = getattr(base_model, "config", None)
    types = {getattr(config, "model_type", None)}
    if config is not None and hasattr(config, "get_text_config"):
        types.add(getattr(config.get_text_config(), "model_type", None))
    modules = {cls.__module__ for cls in type(base_model).__mro__}
    for model_type, paths in DENIED.items():
        if path not in paths:
            continue
        family = f"transformers.models.{_module_name(model_type)}."
        if model_type in types or any(module.startswith(family) for module in modules):
            return f"{paths[path]} ({model_type})"
    return None


def _module_name(model_type: str) -> str:
    """The folder of transformers' models that holds ``model_type`` (``llama4_text``: ``llama4``)."""
    try:
        from transformers.models.auto.configuration_auto import model_type_to_module_name

        return model_type_to_module_name(model_type)
    except ImportError:
        return model_type.replace("-", "_")


def _class_names(cls) -> set:
    return {klass.__name__ for klass in cls.__mro__}


def cache_reason(base_model) -> str | None:
    """Why the model's own cache cannot carry a shared prompt (None: every layer is one of transformers'
    attention key/value layers or recurrent-state layers, which the prompt pass fills and
    :func:`.prompt_pass.expand_prefix` expands)."""
    supports = getattr(base_model, "_supports_default_dynamic_cache", None)
    if callable(supports) and not supports():
        return f"{type(base_model).__name__} does not run on transformers' DynamicCache"
    from .prompt_pass import model_cache

    try:
        layers = model_cache(base_model).layers
    except CACHE_BUILD_ERRORS as error:
        return f"its cache cannot be built from its config ({type(error).__name__}: {error})"
    indexed = sorted({type(x).__name__ for x in layers if INDEXED_LAYER in _class_names(type(x))})
    if indexed:
        return (
            f"its cache layers {indexed} keep a sparse-attention indexer, whose top-k selection ranks the "
            "keys one pass sees"
        )
    other = sorted({type(x).__name__ for x in layers if not _class_names(type(x)) & PREFIX_STATE_LAYERS})
    if other:
        return f"its cache layers {other} are not attention key/value or recurrent-state layers"
    own = sorted({type(x).__name__ for x in layers if type(x).__module__ != CACHE_MODULE})
    if own:
        return f"its cache layers {own} are the model's own (state beyond transformers' key/value layers)"
    return None


def bidirectional(base_model) -> bool:
    """Whether an attention module of the model's text decoder is not causal (``is_causal=False``:
    EmbeddingGemma's ``use_bidirectional_attention``): its prompt positions would attend to the tokens
    after them. A multimodal model's other towers (a vision encoder) never see the prompt."""
    decoder = decoder_of(base_model) or base_model
    return any(getattr(module, "is_causal", True) is False for module in decoder.modules())


def padding_sensitive(base_model) -> bool:
    """Whether a row's result depends on padding beyond what the mask hides: a sparse-attention indexer
    (its top-k counts the padded keys too)."""
    from .prompt_pass import model_cache

    try:
        layers = model_cache(base_model).layers
    except CACHE_BUILD_ERRORS:
        return False
    return any(INDEXED_LAYER in _class_names(type(layer)) for layer in layers)


def length_dependent_ropes(base_model) -> list[tuple[str, int]]:
    """``(rope_type, length)`` of each rope scaling of the model whose frequencies depend on the forward's
    length: LongRoPE (long factors past ``original_max_position_embeddings``) and dynamic NTK (rescaled
    past ``max_position_embeddings``), per layer type where the config has several."""
    config = text_config(base_model)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return []
    entries = [params] if "rope_type" in params or "type" in params else list(params.values())
    found = []
    for entry in entries:
        kind = entry.get("rope_type") or entry.get("type") if isinstance(entry, dict) else None
        if kind == "longrope":
            length = entry.get("original_max_position_embeddings") or getattr(
                config, "original_max_position_embeddings", None
            )
        elif isinstance(kind, str) and "dynamic" in kind:
            length = getattr(config, "max_position_embeddings", None)
        else:
            continue
        if length:
            found.append((kind, int(length)))
    return found


def rope_length_reason(base_model, shortest: int, longest: int) -> str | None:
    """Why a split forward would give some positions other rope frequencies than PEFT's, or None.

    Args:
        shortest: the fewest positions a pass that must agree sees (the prompt pass: N; packed rows: N + the
            shortest document); longest: the most (N + L; N + the longest document).

    LongRoPE picks its factors by the longest position of a forward: exact where both lengths fall on one
    side of its length. Dynamic NTK rescales past its length: exact where neither goes past it.
    """
    for kind, length in length_dependent_ropes(base_model):
        exact = (shortest > length or longest <= length) if kind == "longrope" else longest <= length
        if not exact:
            return (
                f"its {kind} rope scaling depends on the forward's length (past {length} positions): a pass "
                f"of {shortest} positions and one of {longest} would get different frequencies"
            )
    return None


def attention_reason(base_model) -> str | None:
    """Why the model's attention implementation may not apply the mask over a cached prefix, or None."""
    implementation = getattr(text_config(base_model), "_attn_implementation", None)
    if implementation is None or implementation in ATTENTION_IMPLEMENTATIONS or "flash" in implementation:
        return None
    known = ", ".join(ATTENTION_IMPLEMENTATIONS)
    return f"attn_implementation={implementation!r} (sharing runs with {known} and flash attention)"


def router_loss_reason(base_model, kwargs: dict, at_decoder: bool) -> str | None:
    """Why the call's router auxiliary loss would differ when shared, or None: the stock forward's is made
    PEFT's (:mod:`.router_loss`: the family's own loss function gets the prompt's router logits once per
    row) where the model's forward calls one; at the decoder a head of its own computes it."""
    from . import router_loss

    if not router_loss.asked(base_model, kwargs):
        return None
    if at_decoder:
        return (
            "output_router_logits=True with a head of its own (the prompt is shared at the decoder, whose "
            "router logits the head's auxiliary loss would count once, not once per row)"
        )
    return router_loss.decline_reason(base_model)


def active_dropout(base_model) -> str | None:
    """The name of a dropout that is active (training mode, p > 0), or None."""
    for name, module in base_model.named_modules():
        if module.training and isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"dropout module {name or type(module).__name__} (p={module.p})"
    if base_model.training:
        config = text_config(base_model)
        for key, value in config.to_dict().items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if "drop" in key and not key.startswith("summary_") and numeric and value > 0:
                return f"{key}={value}"
    return None


def checkpoint_flagged(base_model) -> list:
    """The training-mode modules whose ``gradient_checkpointing`` flag is on (layers and models)."""
    return [
        m for m in base_model.modules() if getattr(m, "gradient_checkpointing", False) is True and m.training
    ]


def checkpointed_layers(base_model) -> list:
    """The modules that checkpoint themselves in this (training-mode) forward: transformers'
    ``GradientCheckpointingLayer`` instances with checkpointing on, or, where there is none, every module
    whose flag is on (a model that checkpoints its own way)."""
    from transformers import modeling_layers

    layer_type = getattr(modeling_layers, "GradientCheckpointingLayer", ())
    flagged = checkpoint_flagged(base_model)
    return [m for m in flagged if isinstance(m, layer_type)] or flagged


def checkpointing_mode(layers) -> tuple[str | None, str | None]:
    """(mode, reason): mode "reentrant" / "non-reentrant" for the layers' checkpoint function, or a
    reason it cannot be shared under."""
    from transformers import modeling_layers

    base = getattr(modeling_layers, "GradientCheckpointingLayer", None)
    if base is None or not hasattr(base, "_can_checkpoint_with_cache"):
        return None, "gradient checkpointing on this transformers version drops the prompt's cache"
    modes = set()
    for layer in layers:
        if not isinstance(layer, base):
            kind = type(layer).__name__
            return None, f"gradient checkpointing of {kind} (not a GradientCheckpointingLayer)"
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if not isinstance(func, functools.partial):
            return None, "an unrecognized gradient checkpointing function"
        modes.add("reentrant" if func.keywords.get("use_reentrant", True) else "non-reentrant")
    if len(modes) != 1:
        return None, "layers checkpointed with use_reentrant True and False"
    return modes.pop(), None


def why_not_share(peft_model, task: str, kwargs: dict, input_ids: torch.Tensor) -> str | None:
    """Why the shared prefix would not be exact for this call (PEFT's path is taken), or None.

    Args:
        task: the PEFT task type (``"CAUSAL_LM"``, ...).
        kwargs: the base-model keywords PEFT's forward would pass (after the mask prefix and PEFT's own
            adjustments).
        input_ids: ``[B, L]`` int64 / int32 token ids.
    """
    if task not in TASKS:
        return f"task type {task} (sharing applies to {', '.join(TASKS)} on a decoder-only base model)"
    base_model = peft_model.get_base_model()
    model_type = _base_model_type(base_model)
    if getattr(base_model.config, "is_encoder_decoder", False):
        return f"an encoder-decoder model ({model_type!r})"
    denied = denied_reason(base_model, "share")
    if denied is not None:
        return denied
    if input_ids.shape[1] == 0:
        return "no input tokens"
    at_decoder = bool(other_keywords(kwargs)) or not stock_head(base_model)
    runs = decoder_of(base_model) if at_decoder else base_model  # what runs the prompt pass
    if runs is None:
        what = f"keyword {other_keywords(kwargs)[0]!r}" if other_keywords(kwargs) else "a head of its own"
        return f"{what} on a model without a separate decoder"
    if cache_argument(runs) not in _forward_parameters(runs):
        return f"{type(runs).__name__}.forward takes no cache"
    for key in ("output_attentions", "output_hidden_states"):
        if kwargs.get(key):
            return f"{key}=True (the per-layer outputs would lack the rows' virtual positions)"
    for key in CACHE_KEYWORDS:
        if kwargs.get(key) is not None:
            return f"a cache was passed in ({key}=...)"
    reason = router_loss_reason(base_model, kwargs, at_decoder) or attention_reason(base_model)
    if reason is not None:
        return reason
    if task == "TOKEN_CLS" and kwargs.get("labels") is not None:
        return "token classification labels (PEFT does not prefix them)"
    if any(k in kwargs and kwargs[k] is not None for k in LOSS_KEYWORDS) and task != "CAUSAL_LM":
        return "num_items_in_batch outside CAUSAL_LM"
    dropout = active_dropout(base_model)
    if dropout is not None:
        return f"active dropout in training mode ({dropout}): the rows would share one dropout mask"
    layers = checkpointed_layers(base_model) if torch.is_grad_enabled() else []
    if layers:
        _, reason = checkpointing_mode(layers)
        if reason is not None:
            return reason
    observed = observed_reason(base_model, bool(layers))
    if observed is not None:
        return observed
    if bidirectional(base_model):
        return "its attention is bidirectional (is_causal=False): the prompt would see the tokens"
    return cache_reason(base_model)


def other_keywords(kwargs: dict) -> list:
    """The keywords the stock forward's shared path does not pass on (a head's own, such as TRL's
    ``fused_lm_head``): with them the prompt is shared at the decoder (:mod:`.decoder_share`)."""
    return sorted(k for k, v in kwargs.items() if v is not None and k not in _PASSED_ON | LOSS_KEYWORDS)


def decoder_of(base_model) -> torch.nn.Module | None:
    """The decoder whose hidden states a model's head reads: transformers' ``get_decoder()`` (the
    innermost stack: ``LlamaModel``, ``OPTDecoder`` inside ``OPTModel``, ...; what TRL's fused head reaches
    through ``model.base_model``), else ``base_model``, else the child that embeds the tokens; a candidate
    counts only if it holds the input embeddings (ModernBERT's decoder model calls its LM head
    ``decoder``); None when the model is its own decoder."""
    embeddings = _input_embeddings(base_model)
    candidates = []
    if callable(getattr(base_model, "get_decoder", None)):
        try:
            candidates.append(base_model.get_decoder())
        except (AttributeError, NotImplementedError, ValueError):
            pass
    candidates += [getattr(base_model, "base_model", None), _embedding_owner(base_model, embeddings)]
    for decoder in candidates:
        if not isinstance(decoder, torch.nn.Module) or decoder is base_model:
            continue
        if embeddings is None or any(module is embeddings for module in decoder.modules()):
            return decoder
    return None


def _input_embeddings(base_model) -> torch.nn.Module | None:
    get_embeddings = getattr(base_model, "get_input_embeddings", None)
    try:
        return get_embeddings() if callable(get_embeddings) else None
    except (AttributeError, NotImplementedError):
        return None


def _embedding_owner(base_model, embeddings) -> torch.nn.Module | None:
    """The direct child of ``base_model`` that holds ``embeddings`` (the stack a head reads), or None."""
    if embeddings is None:
        return None
    for _, child in base_model.named_children():
        if any(module is embeddings for module in child.modules()):
            return child
    return None


_PARAMETERS: dict = {}  # forward function -> its parameter names (not an lru_cache: dynamo warns on it)


def _parameters_of(forward) -> frozenset:
    names = _PARAMETERS.get(forward)
    if names is None:
        names = _PARAMETERS[forward] = frozenset(inspect.signature(forward).parameters)
    return names


def _forward_parameters(base_model) -> frozenset:
    return _parameters_of(type(base_model).forward)


def sharing_pays(batch: int, prompts: int, num_virtual: int, length: int) -> bool:
    """The default's cost rule: K*N prompt positions plus B*L token positions at most
    ``MAX_POSITION_FRACTION`` of PEFT's B*(N+L), saving at least ``MIN_SAVED_POSITIONS``."""
    full = batch * (num_virtual + length)
    shared = prompts * num_virtual + batch * length
    return shared <= MAX_POSITION_FRACTION * full and full - shared >= MIN_SAVED_POSITIONS


MODEL, DECODER = "model", "decoder"  # where the prompt is shared: the stock forward, or at the decoder


def decide(peft_model, requested, task: str, kwargs: dict, input_ids: torch.Tensor, prompts: int, n: int):
    """Whether and where this forward shares the prompt: ``requested`` (True / False / None) as the call
    or the model's default says. True raises ``ValueError`` naming the reason where sharing is not exact.

    Returns:
        None (PEFT's path), ``MODEL`` (:mod:`.shared_forward`: the stock forward, which then need not
        compute the prompt positions' logits for every row) or ``DECODER`` (:mod:`.decoder_share`: the
        call carries a head's own keywords, e.g. TRL's ``fused_lm_head``, or the head is not
        transformers' own: Liger's fused linear cross-entropy, a user's subclass).

    Args:
        task, kwargs, input_ids: as for :func:`why_not_share` (``input_ids``: ``[B, L]``).
        prompts: K, the distinct prompts of the batch (1, or the adapters of a mixed batch).
        n: N, the virtual tokens of each prompt (0: nothing to share).
    """
    check_request(requested)
    if requested is False or n == 0:
        return None
    # The cost rule first: it is arithmetic, while the checks walk the model's modules (every forward
    # of a batch too small to share would pay for them).
    if requested is None and not sharing_pays(input_ids.shape[0], prompts, n, input_ids.shape[1]):
        CALLS["not shared"] += 1
        return None
    reason = why_not_share(peft_model, task, kwargs, input_ids)
    if reason is None:
        reason = rope_length_reason(peft_model.get_base_model(), n, n + input_ids.shape[1])
    if reason is not None:
        if requested:
            model_type = _base_model_type(peft_model.get_base_model())
            raise ValueError(f"share_prompt_prefix=True cannot apply: {reason} (model type {model_type!r}).")
        CALLS["not shared"] += 1
        return None
    base_model = peft_model.get_base_model()
    return DECODER if other_keywords(kwargs) or not stock_head(base_model) else MODEL


def stock_head(base_model) -> bool:
    """Whether the model's class ``forward`` is transformers' own (the shared forward reads its logits);
    a head of another package (Liger's fused linear cross-entropy patches the class) or a user's subclass
    reads the decoder's hidden states its own way: the prompt is then shared at the decoder."""
    return getattr(type(base_model).forward, "__module__", "").startswith("transformers.")
