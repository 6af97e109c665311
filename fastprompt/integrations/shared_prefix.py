"""``share_prompt_prefix`` (beyond PEFT): run the virtual tokens once per adapter per batch.

In a decoder-only model the N virtual tokens come first and attend only to each other, so their hidden
states, keys and values in every layer are the same for every batch row that uses the same adapter. PEFT
runs them B times (``cat(prompts, tokens)`` for every row); here the prompt runs once per adapter
(:func:`fastprompt.integrations.prompt_pass.run_prompt`, batch K, with grad) and the B rows' L tokens run on
top of its keys/values, with the mask ``[ones(N), attention_mask]`` and positions left to the model (so
they are PEFT's: N.. for most models, derived from the mask for OPT). Every row's gradient flows back
through the one prompt pass.

What the caller gets is PEFT's: CausalLM ``logits`` ``[B, N+L, V]`` (the prompt positions' logits computed
once, then given to every row of the adapter), the cache of N+L positions, and the ``loss`` of the model's
own loss function (``num_items_in_batch`` included) computed from the last virtual position's logits (the
one that predicts the first label) and the token logits: the other N-1 prompt positions predict only
``-100`` labels. Sequence classification pools the last position, which is a token position; token
classification returns every position's logits.

It is taken only where it is exact (:func:`why_not_share` says why not otherwise) and, by default, where it
pays (:func:`sharing_pays`).

Gradient checkpointing: the prompt pass runs without checkpointing (batch K, N positions: small); the
token pass runs checkpointed with a cache that the layers only read (a recomputed layer must see the same
keys/values and must not append to the cache again). With ``use_reentrant=True`` the checkpointed layers
see the prompt keys/values as leaves, and :class:`_PrefixGradients` hands their gradients to the prompt pass
once every layer's backward has run.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect

import torch

from ..prompted_embeds import prompt_prefix_rows
from .prompt_pass import cache_argument, fill_prefix_cache, run_prompt

SHARE_PROMPT_PREFIX = "share_prompt_prefix"
DEFAULT_ATTRIBUTE = "_fastprompt_share_prompt_prefix"

# Base-model types whose shared-prefix forward is checked equal to PEFT's (tests/test_shared_prefix.py).
ARCHITECTURES = frozenset({"gpt2", "llama", "mistral", "qwen2", "opt", "gemma2", "gemma3_text"})
# Of those, the ones whose layers get the cache under gradient checkpointing (GPT-2's model passes its
# blocks None there).
CHECKPOINT_ARCHITECTURES = ARCHITECTURES - {"gpt2"}
TASKS = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS")
# Keywords of the base model's forward that the shared forward passes on as PEFT's path would.
_PASSED_ON = frozenset(
    {"attention_mask", "output_attentions", "output_hidden_states", "return_dict", "labels", "use_cache"}
)
_LOSS_KEYWORDS = frozenset({"num_items_in_batch"})
_CACHE_KEYWORDS = ("cache", "past_key_values")

# The cost rule of ``share_prompt_prefix=None``: share when the token positions run fall to at most this
# fraction of PEFT's B*(N+L), and at least this many positions are saved (a second model call costs a
# fixed overhead that small savings do not repay). Measured: bench/RESULTS.md.
MAX_POSITION_FRACTION = 0.9
MIN_SAVED_POSITIONS = 64

# Counts forwards that shared ("shared") and that took PEFT's path for a reason ("not shared"), for
# tests and diagnostics.
CALLS: collections.Counter = collections.Counter()


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


def _base_model_type(base_model) -> str | None:
    config = getattr(base_model, "config", None)
    return getattr(config, "model_type", None)


def _active_dropout(base_model) -> str | None:
    """The name of a dropout that is active (training mode, p > 0), or None."""
    for name, module in base_model.named_modules():
        if module.training and isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"dropout module {name or type(module).__name__} (p={module.p})"
    if base_model.training:
        config = base_model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for key, value in config.to_dict().items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if "drop" in key and not key.startswith("summary_") and numeric and value > 0:
                return f"{key}={value}"
    return None


def _checkpoint_flagged(base_model) -> list:
    """The training-mode modules whose ``gradient_checkpointing`` flag is on (layers and models)."""
    return [
        m for m in base_model.modules() if getattr(m, "gradient_checkpointing", False) is True and m.training
    ]


def _checkpointed_layers(base_model) -> list:
    """The modules that checkpoint themselves in this (training-mode) forward: transformers'
    ``GradientCheckpointingLayer`` instances with checkpointing on, or, where there is none, every module
    whose flag is on (a model that checkpoints its own way)."""
    from transformers import modeling_layers

    layer_type = getattr(modeling_layers, "GradientCheckpointingLayer", ())
    flagged = _checkpoint_flagged(base_model)
    return [m for m in flagged if isinstance(m, layer_type)] or flagged


def _checkpointing_mode(layers) -> tuple[str | None, str | None]:
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

    ``kwargs``: the base-model keywords PEFT's forward would pass (after the mask prefix and PEFT's own
    adjustments).
    """
    if task not in TASKS:
        return f"task type {task} (sharing applies to {', '.join(TASKS)} on a decoder-only base model)"
    base_model = peft_model.get_base_model()
    model_type = _base_model_type(base_model)
    if model_type not in ARCHITECTURES:
        return (
            f"base model type {model_type!r} is not among those checked equal to PEFT's path "
            f"({', '.join(sorted(ARCHITECTURES))})"
        )
    if input_ids.shape[1] == 0:
        return "no input tokens"
    if cache_argument(base_model) not in _forward_parameters(base_model):
        return f"{type(base_model).__name__}.forward takes no cache"
    for key in ("output_attentions", "output_hidden_states"):
        if kwargs.get(key):
            return f"{key}=True (the per-layer outputs would lack the rows' virtual positions)"
    for key in _CACHE_KEYWORDS:
        if kwargs.get(key) is not None:
            return f"a cache was passed in ({key}=...)"
    others = sorted(k for k, v in kwargs.items() if v is not None and k not in _PASSED_ON | _LOSS_KEYWORDS)
    if others:
        return f"keyword {others[0]!r} is not supported with a shared prompt"
    if task == "TOKEN_CLS" and kwargs.get("labels") is not None:
        return "token classification labels (PEFT does not prefix them)"
    if any(k in kwargs and kwargs[k] is not None for k in _LOSS_KEYWORDS) and task != "CAUSAL_LM":
        return "num_items_in_batch outside CAUSAL_LM"
    dropout = _active_dropout(base_model)
    if dropout is not None:
        return f"active dropout in training mode ({dropout}): the rows would share one dropout mask"
    if torch.is_grad_enabled():
        layers = _checkpointed_layers(base_model)
        if layers and model_type not in CHECKPOINT_ARCHITECTURES:
            return f"gradient checkpointing of {model_type!r}, whose model gives its layers no cache then"
        if layers:
            _, reason = _checkpointing_mode(layers)
            if reason is not None:
                return reason
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
    """Whether running K prompts once and B*L tokens beats B*(N+L) positions (the default's cost rule)."""
    full = batch * (num_virtual + length)
    shared = prompts * num_virtual + batch * length
    return shared <= MAX_POSITION_FRACTION * full and full - shared >= MIN_SAVED_POSITIONS


def decide(peft_model, requested, task: str, kwargs: dict, input_ids: torch.Tensor, prompts: int, n: int):
    """Whether this forward shares the prompt: ``requested`` (True / False / None) as the call or the
    model's default says. True raises ``ValueError`` naming the reason where sharing is not exact."""
    check_request(requested)
    if requested is False or n == 0:
        return False
    reason = why_not_share(peft_model, task, kwargs, input_ids)
    if reason is not None:
        if requested:
            raise ValueError(f"share_prompt_prefix=True cannot apply: {reason}.")
        CALLS["not shared"] += 1
        return False
    if requested is None and not sharing_pays(input_ids.shape[0], prompts, n, input_ids.shape[1]):
        CALLS["not shared"] += 1
        return False
    return True


# ----------------------------------------------------------------------------- the shared forward


def _read_only_update(layer, key_states, value_states, *args, **kwargs):
    """What ``update`` returns (the cached keys/values then the new ones), without storing anything."""
    return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


@contextlib.contextmanager
def _instance_attributes(modules, name: str, value):
    """Set ``name`` on each module instance for the duration (the class attribute comes back after)."""
    saved = [(m, m.__dict__.get(name, _MISSING)) for m in modules]
    for module in modules:
        object.__setattr__(module, name, value)
    try:
        yield
    finally:
        for module, old in saved:
            if old is _MISSING:
                module.__dict__.pop(name, None)
            else:
                object.__setattr__(module, name, old)


_MISSING = object()


class _PrefixGradients(torch.autograd.Function):
    """Identity on the token embeddings; its backward, which runs after every checkpointed layer's
    backward (the token pass starts from its output), returns the gradients the layers accumulated into
    the prompt keys/values' leaves as the gradients of the prompt pass's keys/values."""

    @staticmethod
    def forward(ctx, token_embeds, leaves, *prefix):
        ctx.leaves = leaves
        return token_embeds.clone()

    @staticmethod
    def backward(ctx, grad):
        leaves, ctx.leaves = ctx.leaves, None
        missing = [leaf for leaf in leaves if leaf.grad is None]
        if missing:
            raise RuntimeError(
                "share_prompt_prefix with use_reentrant=True gradient checkpointing: the prompt keys/values "
                "got no gradient (torch.autograd.grad(..., inputs=...) does not accumulate them); use "
                "loss.backward(), or pass share_prompt_prefix=False."
            )
        return (grad, None, *(leaf.grad for leaf in leaves))


def shared_forward(peft_model, task: str, input_ids, n: int, rows, kwargs: dict):
    """The base model's output for ``cat(prompts, tokens)`` per row, with the prompt run once per adapter.

    Args:
        task: the PEFT task type (one of ``TASKS``).
        input_ids: [B, L] token ids.
        n: N, the virtual tokens of the adapter(s).
        rows: ``RowAdapters`` of a mixed batch, or None (the active adapter).
        kwargs: what PEFT's path would pass to the base model besides ``inputs_embeds`` (the mask already
            prefixed to [B, N+L]; CausalLM ``labels`` NOT prefixed).

    Returns:
        What the base model returns on PEFT's path (a ModelOutput, or a tuple with ``return_dict=False``).
    """
    base_model = peft_model.get_base_model()
    batch = input_ids.shape[0]
    if rows is None:
        modules, index = [peft_model.prompt_encoder[peft_model.active_adapter]], None
    else:
        modules = [peft_model.prompt_encoder[name] for name in rows.names]
        index = torch.tensor(rows.table_index, dtype=torch.int64, device=input_ids.device)
    word_embeddings = peft_model.word_embeddings
    token_embeds = word_embeddings(input_ids)  # [B, L, D], exactly PEFT's call
    prompt_embeds = prompt_prefix_rows(modules, n, token_embeds.dtype).to(token_embeds.device)  # [K, N, D]

    layers = _checkpointed_layers(base_model) if torch.is_grad_enabled() else []
    mode = _checkpointing_mode(layers)[0] if layers else None
    flagged = _checkpoint_flagged(base_model) if layers else []
    with _instance_attributes(flagged, "gradient_checkpointing", False):
        prompt = run_prompt(base_model, prompt_embeds, all_logits=task != "SEQ_CLS")  # batch K, N positions

    keys, values = prompt.keys, prompt.values
    if mode == "reentrant":
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in (*keys, *values)]
        if any(leaf.requires_grad for leaf in leaves):
            token_embeds = _PrefixGradients.apply(token_embeds, leaves, *keys, *values)
        keys, values = leaves[: len(keys)], leaves[len(keys) :]

    from transformers import DynamicCache

    cache = DynamicCache(config=base_model.config)
    fill_prefix_cache(cache, keys, values, index, batch)

    call = dict(kwargs)
    labels = call.pop("labels", None) if task == "CAUSAL_LM" else call.get("labels")
    loss_kwargs = {k: call.pop(k) for k in _LOSS_KEYWORDS if k in call}
    use_cache = call.pop("use_cache", None)
    return_dict = call.pop("return_dict", None)
    call.update({cache_argument(base_model): cache, "use_cache": True, "return_dict": True})

    if mode is not None:  # the layers read the cache; a recomputed layer must not append to it again
        for layer in cache.layers:
            layer.update = functools.partial(_read_only_update, layer)
        with _instance_attributes(layers, "_can_checkpoint_with_cache", True):
            output = base_model(inputs_embeds=token_embeds, **call)
    else:
        output = base_model(inputs_embeds=token_embeds, **call)

    fields = dict(output.items())
    if task != "SEQ_CLS":
        prompt_logits = prompt.output.logits  # [K, N, V]
        token_logits = output.logits  # [B, L, V]
        if labels is not None:  # the last virtual position predicts the first label; the rest only -100
            last = _rows(prompt_logits[:, -1:], index, batch)  # [B, 1, V]: no gradient buffer of [B, N, V]
            fields["loss"] = _causal_lm_loss(
                base_model.loss_function, last, token_logits, labels, loss_kwargs
            )
        fields["logits"] = torch.cat((_rows(prompt_logits, index, batch), token_logits), dim=1)
    if not _uses_cache(base_model, use_cache, mode):
        for key in _CACHE_KEYWORDS:
            fields.pop(key, None)
    output = type(output)(**fields)  # the fields in the model output's own order
    CALLS["shared"] += 1
    return output if return_dict is not False else output.to_tuple()


def _causal_lm_loss(loss_function, last, token_logits, labels, loss_kwargs: dict) -> torch.Tensor:
    """The model's causal-LM loss over the positions ``[last virtual, tokens]`` of every row.

    Args:
        loss_function: the base model's ``loss_function``.
        last: ``[B, 1, V]`` logits of each row's last virtual position (it predicts ``labels[:, 0]``).
        token_logits: ``[B, L, V]`` logits of the token positions (the model's dtype).
        labels: ``[B, L]`` int64, ``-100`` where ignored.
        loss_kwargs: ``num_items_in_batch`` when the caller (``Trainer``) passed it.

    Any loss function gets ``cat(last, token_logits)`` with the labels ``[-100, labels]``. transformers'
    own ``ForCausalLMLoss`` (the default of causal LMs) is computed as it would on that input without the
    ``[B, L+1, V]`` copy: the summed cross-entropy of the token positions and of the last virtual
    positions (logits upcast to fp32 as it does), over ``num_items_in_batch`` or the number of labels
    that are not ``-100`` (``reduction="mean"``'s count; 0/0 gives its NaN).
    """
    if loss_function is not _transformers_causal_lm_loss():
        first = torch.full((labels.shape[0], 1), -100, dtype=labels.dtype, device=labels.device)
        return loss_function(
            logits=torch.cat((last, token_logits), dim=1),
            labels=torch.cat((first, labels), dim=1),
            vocab_size=token_logits.shape[-1],
            **loss_kwargs,
        )
    vocab = token_logits.shape[-1]
    labels = labels.to(token_logits.device)
    next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # token i predicts label i+1
    total = torch.nn.functional.cross_entropy(
        token_logits.float().reshape(-1, vocab), next_labels.reshape(-1), ignore_index=-100, reduction="sum"
    ) + torch.nn.functional.cross_entropy(
        last.float().reshape(-1, vocab), labels[:, 0], ignore_index=-100, reduction="sum"
    )
    num_items = loss_kwargs.get("num_items_in_batch")
    if num_items is None:
        num_items = (labels != -100).sum()
    elif torch.is_tensor(num_items):
        num_items = num_items.to(total.device)
    return total / num_items


def _transformers_causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss


def _rows(per_prompt: torch.Tensor, index: torch.Tensor | None, batch: int) -> torch.Tensor:
    """[K, ...] per prompt -> [B, ...] per batch row (``index``: the prompt of each row; None: K = 1)."""
    return (
        per_prompt.expand(batch, *per_prompt.shape[1:])
        if index is None
        else per_prompt.index_select(0, index)
    )


def _uses_cache(base_model, use_cache, checkpointing_mode) -> bool:
    """Whether PEFT's path would return a cache: ``use_cache`` or the config's, and no checkpointing."""
    if checkpointing_mode is not None:
        return False
    if use_cache is None:
        use_cache = getattr(base_model.config.get_text_config(), "use_cache", False)
    return bool(use_cache)
