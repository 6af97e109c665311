"""Generation for PEFT prompt-tuning models (and P-tuning, multitask prompt tuning), with ``prompt_concat``.

Multitask: ``task_ids`` ([B]) is taken out of the call and becomes the batch's prompts (one per distinct
task, ``peft_prompt_methods.batch_rows``); beams and ``num_return_sequences`` repeat each row's prompt as
they repeat the row.

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

import contextlib
import copy
import dataclasses
import inspect
import sys
import threading
import warnings
import weakref

import torch

from ..prompt_once import kv_store as prompt_kv
from ..prompt_once.policy import cache_reason, denied_reason, rope_length_reason
from ..prompt_once.prompt_pass import (
    CACHE_BUILD_ERRORS,
    LAYER_TYPES,
    cache_argument,
    cache_layer_kinds,
    fill_prefix_cache,
    holds_prompt,
    prefix_state_layers,
    starts_from_own_cache,
)
from .adapter_batches import RowAdapters, pop_adapter_names
from .peft_inputs_embeds import model_inputs_embeds
from .peft_prompt_methods import TASK_IDS, batch_rows, is_multitask

CACHE_KEYS = ("cache", "past_key_values")  # transformers >= 5.24, < 5.24


def _find_cache(model_kwargs: dict):
    for key in CACHE_KEYS:
        if model_kwargs.get(key, None) is not None:
            return model_kwargs[key]
    return None


def _cache_length(cache) -> int:
    """The positions a cache holds; for a cache of recurrent layers only (a state-space model), which
    counts none, 0 while it is empty and unbounded once it holds a state."""
    if isinstance(cache, (tuple, list)):
        return cache[0][0].shape[-2]
    try:
        return cache.get_seq_length()
    except ValueError:  # transformers: only recurrent layers, no length to give
        return sys.maxsize if any(holds_prompt(layer) for layer in cache.layers) else 0


def _is_empty_cache(cache) -> bool:
    import transformers

    return isinstance(cache, transformers.Cache) and not _cache_length(cache)


def _prefixed_generation_mask(model_kwargs: dict, attention_mask, num_prompt: int) -> None:
    """The 2-D mask with N ones in front, as PEFT does (``cat(ones(B, N), mask)``: float32 ones).

    ``attention_mask`` is the 2-D mask ``generate`` keeps (over the tokens so far). A 4-D mask the base
    model's ``prepare_inputs_for_generation`` may have built from it (compilable caches: ``static``) is
    sized for the tokens without the prompt; it is dropped, and the model builds its own from the 2-D one.
    """
    if attention_mask is None or getattr(attention_mask, "dim", lambda: 0)() != 2:
        if isinstance(model_kwargs.get("attention_mask"), (dict, torch.Tensor)):
            model_kwargs["attention_mask"] = None
        return
    input_ids = model_kwargs["input_ids"]
    prefix = torch.ones(attention_mask.shape[0], num_prompt).to(attention_mask.device)
    model_kwargs["attention_mask"] = torch.cat((prefix, attention_mask), dim=1).to(input_ids.device)


def causal_lm_prepare_inputs_for_generation(peft_model, args: tuple, kwargs: dict) -> dict:
    """``PeftModelForCausalLM.prepare_inputs_for_generation`` for prompt tuning (``task_ids`` removed).

    Inside :func:`causal_lm_generate`: with prompt-KV reuse, the first call writes the stored
    virtual-token keys/values into the (empty) generation cache and feeds the L input tokens only; with
    ``adapter_names``, each row gets its adapter's prompt.
    """
    config = peft_model.active_peft_config
    state = generation_states().get(peft_model)
    num_prompt = config.num_virtual_tokens if state is None else state.num_virtual_tokens
    reuse_prefill = state is not None and state.pending is not None
    if reuse_prefill:
        full_ids = args[0] if args else kwargs["input_ids"]
        fill_prompt_kv(_find_cache(kwargs), state.pending, full_ids.shape[0])
        state.pending = None
    model_kwargs = peft_model.base_model_prepare_inputs_for_generation(*args, **kwargs)
    cache = _find_cache(model_kwargs)

    if reuse_prefill:  # the cache holds the N prompt positions: the whole input goes in
        model_kwargs["input_ids"] = full_ids.clone(memory_format=torch.contiguous_format)
    # Once the cache holds the prefix (prompts + tokens so far), feed only the newest token.
    elif cache is not None and _cache_length(cache) >= model_kwargs["input_ids"].shape[1]:
        model_kwargs["input_ids"] = model_kwargs["input_ids"][:, -1:]

    if not ("attention_mask" in model_kwargs and model_kwargs["attention_mask"] is None):
        _prefixed_generation_mask(model_kwargs, kwargs.get("attention_mask"), num_prompt)
    # else the base model runs this step without a mask (FalconMamba's decoding steps: its mixers would
    # multiply one position's states by the whole mask)
    # generate() builds position ids at every step (0.. over the tokens): PEFT drops them for prompt tuning,
    # with a warning about ids the user never passed; dropped here without it.
    model_kwargs.pop("position_ids", None)
    peft_model._adjust_prompt_learning_kwargs(config, kwargs=model_kwargs)

    given = args[0] if args else kwargs.get("input_ids")
    fed = model_kwargs.get("input_ids")
    # A model whose state is not a transformers cache (RWKV's ``state``) shortens the ids itself once it
    # holds the sequence so far: the prompts went in at the prefill.
    shortened = torch.is_tensor(given) and torch.is_tensor(fed) and fed.shape[1] < given.shape[1]
    if not reuse_prefill and not shortened and (cache is None or _is_empty_cache(cache)):
        input_ids = model_kwargs["input_ids"]
        rows = None if state is None else state.rows
        if rows is not None:  # generate expanded every row for num_beams / num_return_sequences
            rows = rows.repeat_rows(input_ids.shape[0] // len(rows.table_index))
        model_kwargs["inputs_embeds"] = model_inputs_embeds(peft_model, input_ids, num_prompt, rows)
        model_kwargs["input_ids"] = None

    # The model derives cache_position from inputs_embeds (which now include the prompts).
    model_kwargs.pop("cache_position", None)
    return model_kwargs


# ------------------------------------------------------------------ CausalLM: prompt-KV reuse

_REUSE_MODES = ("greedy_search", "sample", "beam_search", "beam_sample")
_REUSE_CACHES = (None, "dynamic", "static")

_LOCAL = threading.local()  # per thread: {model: GenerationState} of the generate calls running there


def generation_states() -> weakref.WeakKeyDictionary:
    """This thread's running ``generate`` calls: {PEFT model: :class:`GenerationState`}."""
    states = getattr(_LOCAL, "states", None)
    if states is None:
        states = _LOCAL.states = weakref.WeakKeyDictionary()
    return states


@dataclasses.dataclass
class PendingKV:
    """Prompt KV waiting to be written into the generation cache at the prefill.

    Attributes:
        keys, values: per layer ``[K, H_kv, N, head_dim]``, one row per distinct adapter.
        table_index: ``[B]`` int64 row -> adapter row of ``keys`` (None: every row uses row 0).
        batch_size: B, the rows ``generate`` was called with (``num_beams`` / ``num_return_sequences``
            expand each row, consecutively, before the prefill).
        states: for a model whose cache has recurrent layers, each adapter's whole cache after its prompt
            (``PromptKV.state``), which the generation cache starts from instead; else None.
    """

    keys: list
    values: list
    table_index: torch.Tensor | None
    batch_size: int | None
    states: list | None = None


@dataclasses.dataclass
class GenerationState:
    """What one ``generate`` call hands to its ``prepare_inputs_for_generation`` calls.

    Attributes:
        num_virtual_tokens: N of the adapter(s) generating.
        rows: with ``adapter_names``, each row's adapter (None: the active adapter for every row).
        pending: the prompt KV to write into the cache at the prefill (None: no reuse, or written).
    """

    num_virtual_tokens: int
    rows: RowAdapters | None = None
    pending: PendingKV | None = None


def fill_prompt_kv(cache, pending: PendingKV, rows: int) -> None:
    """Write the pending prompt KV into the empty generation ``cache`` for ``rows`` batch rows
    (``num_beams`` / ``num_return_sequences`` repeat each of the call's rows consecutively)."""
    if cache is None:
        raise RuntimeError("reuse_prompt_kv: generate() prepared no cache for the prefill.")
    index = pending.table_index
    if index is not None:
        if rows % pending.batch_size:
            raise RuntimeError(f"reuse_prompt_kv: {rows} rows at the prefill, batch of {pending.batch_size}.")
        index = index.repeat_interleave(rows // pending.batch_size)
    try:
        if pending.states is not None:  # a hybrid: the prompts' whole state, layer for layer
            if _cache_length(cache) or len(cache.layers) != len(pending.states[0].layers):
                raise RuntimeError("the generation cache is not an empty cache of the model's own layers.")
            cache.layers[:] = prefix_state_layers(pending.states, index, rows)
        else:
            fill_prefix_cache(cache, pending.keys, pending.values, index, rows)
    except RuntimeError as error:
        raise RuntimeError(f"reuse_prompt_kv: {error} Pass reuse_prompt_kv=False.") from None


def _effective_generation_config(base_model, kwargs: dict):
    """The GenerationConfig ``generate`` will run with (``generation_config`` or the model's, updated by
    the keyword arguments), for deciding whether the prompt KV can be reused."""
    config = kwargs.get("generation_config") or base_model.generation_config
    config = copy.deepcopy(config)
    config.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
    return config


def _training(model) -> bool:
    return any(module.training for module in model.modules())


def _why_no_reuse(peft_model, kwargs: dict) -> tuple[str | None, bool]:
    """(reason, silent): why the prompt KV cannot be reused here, or (None, False) when it can.
    ``silent`` reasons never raise, even for ``reuse_prompt_kv=True`` (the issue's "does not reuse")."""
    base_model = peft_model.get_base_model()
    if _training(peft_model):
        return "the model is in training mode (dropout): the prompt KV is recomputed at every call", True
    config = _effective_generation_config(base_model, kwargs)
    if config.use_cache is False:
        return "use_cache=False: no cache to start from", True
    for key in (*CACHE_KEYS, "cache_params"):
        if kwargs.get(key) is not None:
            return f"a cache was passed in ({key}=...)", False
    for key in ("assistant_model", "custom_generate", "negative_prompt_ids", "prefix_allowed_tokens_fn"):
        if kwargs.get(key) is not None:
            return f"{key} is not supported with prompt-KV reuse", False
    mode = config.get_generation_mode(kwargs.get("assistant_model"))
    mode = getattr(mode, "value", mode)
    if mode not in _REUSE_MODES:
        return f"generation mode {mode!r} (supported: {', '.join(_REUSE_MODES)})", False
    if config.cache_implementation not in _REUSE_CACHES:
        implementation = config.cache_implementation
        return f"cache_implementation={implementation!r} (supported: None, 'dynamic', 'static')", False
    if getattr(config, "prefill_chunk_size", None) is not None:
        return "prefill_chunk_size is not supported with prompt-KV reuse", False
    if config.output_attentions or config.output_hidden_states:
        return "output_attentions / output_hidden_states would lack the virtual-token rows", False
    if getattr(config, "prompt_lookup_num_tokens", None) is not None:
        return "prompt_lookup_num_tokens is not supported with prompt-KV reuse", False
    try:
        kinds = set(cache_layer_kinds(base_model))
    except CACHE_BUILD_ERRORS as error:
        return f"the model's cache cannot be built from its config ({type(error).__name__}: {error})", False
    denied = denied_reason(base_model, "generate")
    if denied is not None:
        return denied, False
    if not base_model._supports_default_dynamic_cache():
        return f"{type(base_model).__name__} does not run on transformers' DynamicCache", False
    if cache_argument(base_model) not in inspect.signature(type(base_model).forward).parameters:
        name = type(base_model).__name__  # its state goes by another name (Mamba-2's cache_params on 5.22)
        return f"{name}.forward takes no transformers cache (cache / past_key_values)", False
    if starts_from_own_cache(base_model):  # a hybrid, placeholders: from the prompt's whole cache state
        reason = cache_reason(base_model)
        return (None if reason is None else f"the model's {reason.removeprefix('its ')}"), False
    if not kinds <= set(LAYER_TYPES):
        return f"the model's cache layers {sorted(kinds)} are not plain key/value layers", False
    return None, False


def _why_not_fill(peft_model, pending: PendingKV) -> str | None:
    """Why the prompt pass's keys/values cannot fill the cache ``generate`` makes (layer for layer), or
    None: a model whose prompt pass (a full-attention cache) fills other layers than its own cache has
    (extra or KV-shared layers)."""
    if pending.states is not None:  # the model's own cache, layer for layer
        return None
    layers = len(cache_layer_kinds(peft_model.get_base_model()))
    if len(pending.keys) != layers or any(k is None for k in pending.keys):
        return (
            f"the prompt pass fills {len(pending.keys)} cache layers, the model's cache has {layers} "
            "(extra or KV-shared layers)"
        )
    return None


@contextlib.contextmanager
def _static_cache_room(base_model, extra: int):
    """Size a ``static`` cache that ``generate`` creates for the N virtual tokens too (transformers sizes
    it for the ids it sees, ``max_length - 1``), by adding ``extra`` to its ``max_cache_len``."""
    original = getattr(base_model, "_prepare_static_cache", None)
    if original is None or "_prepare_static_cache" in base_model.__dict__:
        yield
        return
    signature = inspect.signature(original)

    def prepare_static_cache(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["max_cache_len"] = bound.arguments["max_cache_len"] + extra
        return original(*bound.args, **bound.kwargs)

    base_model.__dict__["_prepare_static_cache"] = prepare_static_cache
    try:
        yield
    finally:
        base_model.__dict__.pop("_prepare_static_cache", None)


def _pending_prompt_kv(peft_model, rows: RowAdapters | None) -> PendingKV:
    """The prompt KV for the batch: the active adapter's, or one per distinct adapter of ``rows``."""
    store = prompt_kv.prompt_kv_store(peft_model)
    tasks = None if rows is None else rows.tasks or (None,) * len(rows.names)
    if rows is None or len(rows.names) == 1:
        name = peft_model.active_adapter if rows is None else rows.names[0]
        entry = store.get(peft_model, name, None if rows is None else tasks[0])
        states = None if entry.state is None else [entry.state]
        return PendingKV(entry.keys, entry.values, None, None, states)
    entries = [store.get(peft_model, name, task) for name, task in zip(rows.names, tasks, strict=True)]
    index = torch.tensor(rows.table_index, dtype=torch.int64)
    if entries[0].state is not None:
        return PendingKV([], [], index, len(rows.table_index), [e.state for e in entries])
    keys = [torch.cat(layer, dim=0) for layer in zip(*(e.keys for e in entries), strict=True)]
    values = [torch.cat(layer, dim=0) for layer in zip(*(e.values for e in entries), strict=True)]
    return PendingKV(keys, values, index, len(rows.table_index))


def _batch_input_ids(args: tuple, kwargs: dict):
    """The ``input_ids`` a ``generate`` call was given (positional, ``input_ids=`` or ``inputs=``)."""
    for candidate in (args[0] if args else None, kwargs.get("input_ids"), kwargs.get("inputs")):
        if isinstance(candidate, torch.Tensor):
            return candidate
    return None


def causal_lm_generate(peft_model, original, args: tuple, kwargs: dict, reuse: bool | None):
    """``PeftModelForCausalLM.generate`` for prompt tuning, reusing the adapter's prompt KV.

    Args:
        original: PEFT's ``generate`` (which puts the model's ``prepare_inputs_for_generation`` in place).
        reuse: ``reuse_prompt_kv``: None (default) reuses where it applies and otherwise generates
            without reuse; True also, but raises ``ValueError`` where reuse cannot apply for a reason other
            than ``use_cache=False`` or training mode (which never reuse); False never reuses.

    Output: what ``generate`` returns (ids ``[B * num_return_sequences, L + new]`` or a GenerateOutput),
    equal to generation without reuse.
    """
    if reuse is not None and not isinstance(reuse, bool):
        raise TypeError(f"reuse_prompt_kv must be True, False or None, got {reuse!r}.")
    kwargs = dict(kwargs)
    adapter_names = pop_adapter_names(kwargs)
    multitask = is_multitask(peft_model)
    task_ids = kwargs.pop(TASK_IDS, None) if multitask else None  # the rows carry the tasks
    rows = None
    if adapter_names is not None or multitask:
        input_ids = _batch_input_ids(args, kwargs)
        if input_ids is None or input_ids.dim() != 2:
            what = "adapter_names=..." if adapter_names is not None else "task_ids=..., multitask"
            raise ValueError(
                f"generate({what}) needs input_ids ([B, L] token ids) and no inputs_embeds: the "
                "prompts are put before the embeddings of input_ids"
            )
        rows = batch_rows(peft_model, adapter_names, task_ids, input_ids.shape[0])
    state = GenerationState(
        peft_model.active_peft_config.num_virtual_tokens if rows is None else rows.num_virtual_tokens, rows
    )
    if reuse is not False:
        reason, silent = _why_no_reuse(peft_model, kwargs)
        if reason is None:
            input_ids = _batch_input_ids(args, kwargs)
            if input_ids is not None:
                n = state.num_virtual_tokens
                reason = rope_length_reason(peft_model.get_base_model(), n, n + input_ids.shape[-1])
        if reason is None:
            pending = _pending_prompt_kv(peft_model, rows)
            reason = _why_not_fill(peft_model, pending)
            state.pending = pending if reason is None else None
        if reason is not None and reuse and not silent:
            raise ValueError(f"reuse_prompt_kv=True cannot apply: {reason}.")
    states = generation_states()
    if states.get(peft_model) is not None:
        raise RuntimeError("generate() is already running on this model in this thread (re-entrant call).")
    states[peft_model] = state
    try:
        with _static_cache_room(peft_model.get_base_model(), state.num_virtual_tokens):
            return original(peft_model, *args, **kwargs)
    finally:
        states.pop(peft_model, None)


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
        task_ids = kwargs.pop(TASK_IDS, None)
        adapter_names = pop_adapter_names(kwargs)
        n = config.num_virtual_tokens
        rows = batch_rows(peft_model, adapter_names, task_ids, input_ids.shape[0])
        if rows is not None:
            n = rows.num_virtual_tokens
        kwargs["inputs_embeds"] = model_inputs_embeds(peft_model, input_ids, n, rows)
        if "attention_mask" in kwargs:
            prefix = torch.ones(input_ids.shape[0], n).to(kwargs["attention_mask"].device)
            kwargs["attention_mask"] = torch.cat((prefix, kwargs["attention_mask"]), dim=1)
        return base_model.generate(**kwargs)
    finally:
        base_model.prepare_inputs_for_generation = peft_model.base_model_prepare_inputs_for_generation
