"""Prefix tuning (PEFT's ``PREFIX_TUNING``) on fastprompt's prompt-once machinery.

PEFT 0.21.2's definition (``get_prompt``, ``PeftModelForCausalLM.forward``) is kept: the prefix encoder's
output laid out as every layer's N keys/values (:mod:`fastprompt.prompt_once.prefix_kv`), the tokens run on
a cache holding them with ``attention_mask = [ones(B, N), mask]``, given ``position_ids`` shifted by N.
What changes:

- the encoder runs once per adapter per batch (PEFT: once per row), and the keys/values go into the model's
  own cache (``DynamicCache(config=...)``), expanded over the adapter's rows;
- ``adapter_names`` (beyond PEFT): one prefix adapter per row, each row equal to its adapter alone. The
  adapters of one batch must have the same N (a clear error otherwise) and all be prefix adapters;
- generation puts the prefix into the cache ``generate`` makes once, at the prefill, and never again (PEFT
  0.21.2 re-inserts it at every step on transformers >= 5.24, where the cache argument is ``cache``);
- gradient checkpointing (reentrant or not) runs: the layers read the prefix cache without appending to it
  (PEFT refuses it when the adapter is added and fails in the forward);
- packed rows (``position_ids`` restarting inside a row, CAUSAL_LM): each document on its own prefix at
  positions N + its own, as if alone (PEFT shows the prefix once per row and lets documents see each
  other): the decoder runs the documents as a padded batch (:mod:`fastprompt.prompt_once.prefix_packed`).

``share_prompt_prefix`` and ``reuse_prompt_kv`` are accepted (checked) and change nothing here: a prefix
never runs through the model, it is always put in the cache once per adapter per batch (the share), and
once per ``generate`` call (the reuse).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ..prompt_once import packed, packed_forward, prefix_kv, prefix_packed
from ..prompt_once.policy import SHARE_PROMPT_PREFIX, bidirectional, check_request, text_config
from ..prompt_once.prompt_pass import cache_argument
from .adapter_batches import RowAdapters, pop_adapter_names

PREFIX_TUNING = "PREFIX_TUNING"
CACHE_KEYS = ("cache", "past_key_values")  # transformers >= 5.24, < 5.24


def is_prefix(config) -> bool:
    """Whether an adapter's config is prefix tuning."""
    return getattr(config, "peft_type", None) == PREFIX_TUNING


def prefix_active(peft_model) -> bool:
    """Whether the model's active adapter is prefix tuning."""
    try:
        config = peft_model.peft_config[peft_model.active_adapter]
    except (AttributeError, KeyError, TypeError):
        return False
    return is_prefix(config)


def prefix_adapters(peft_model) -> list[str]:
    """The model's prefix-tuning adapters."""
    return [name for name, config in getattr(peft_model, "peft_config", {}).items() if is_prefix(config)]


def expected_layout(model) -> dict | None:
    """``num_layers`` / ``token_dim`` / ``num_attention_heads`` PEFT fills into a prefix-tuning config for
    ``model`` (what a prefix adapter file for it must hold), or None where PEFT cannot tell."""
    if not hasattr(model, "config"):
        return None
    from peft import PrefixTuningConfig
    from peft.utils.other import _prepare_prompt_learning_config

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=1)
    try:
        _prepare_prompt_learning_config(config, model.config)
    except (ValueError, KeyError, AttributeError, TypeError):
        return None
    return {name: getattr(config, name) for name in ("num_layers", "token_dim", "num_attention_heads")}


def rows_for_prefix_adapters(peft_model, adapter_names, batch_size: int) -> RowAdapters | None:
    """Which prefix adapter each batch row takes (None: the active adapter for every row).

    Raises:
        TypeError: ``adapter_names`` is not a list or tuple of strings.
        ValueError: another length than B; a name that is not a prefix adapter of the model (a
            prompt-tuning adapter among them: prefix and prompt tuning cannot share one batch); adapters
            with different ``num_virtual_tokens``.
    """
    if adapter_names is None:
        return None
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(
            f"adapter_names must be a list with one adapter name per batch row, got {adapter_names!r}"
        )
    if len(adapter_names) != batch_size:
        raise ValueError(
            f"adapter_names has {len(adapter_names)} names but the batch has {batch_size} rows: one adapter "
            "name per batch row is expected"
        )
    available = prefix_adapters(peft_model)
    names = tuple(dict.fromkeys(adapter_names))
    for name in names:
        if name not in available:
            if name in peft_model.peft_config:
                kind = peft_model.peft_config[name].peft_type
                raise ValueError(
                    f"adapter_names holds {name!r}, a {kind} adapter, with the prefix-tuning adapter "
                    f"{peft_model.active_adapter!r} active: prefix tuning puts keys/values in the cache, the "
                    "other soft prompts put rows before the tokens, and one batch cannot mix them; batch "
                    f"those rows separately. The prefix-tuning adapters are {available}"
                )
            raise ValueError(
                f"adapter_names holds {name!r}, which is not an adapter of this model; its prefix-tuning "
                f"adapters are {available}"
            )
    tokens = {name: peft_model.peft_config[name].num_virtual_tokens for name in names}
    if len(set(tokens.values())) > 1:
        listed = ", ".join(f"{name!r}: N={n}" for name, n in tokens.items())
        raise ValueError(
            f"adapter_names mixes prefix-tuning adapters with different num_virtual_tokens ({listed}): the "
            "tokens of a row start at position N, so a mixed batch needs one N; batch those rows separately"
        )
    position = {name: k for k, name in enumerate(names)}
    return RowAdapters(names, tuple(position[name] for name in adapter_names), tokens[names[0]])


@contextlib.contextmanager
def checkpointing_allowed(model, peft_config):
    """Lift PEFT's refusal to add a prefix adapter to a model with gradient checkpointing on (fastprompt's
    prefix path runs under it): the modules' flags are off while PEFT sets the adapter up."""
    flagged = []
    if is_prefix(peft_config):
        flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in flagged:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in flagged:
            module.gradient_checkpointing = True


PREFIX_TASKS = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS")  # on a decoder: fastprompt's prefix path


def takes_prefix_path(base_model, config) -> bool:
    """Whether an adapter of ``config`` on ``base_model`` runs fastprompt's prefix path (a prefix adapter of
    a decoder-only task on a causal decoder; encoder-decoder and encoder models keep PEFT's)."""
    if not is_prefix(config) or getattr(config, "task_type", None) not in PREFIX_TASKS:
        return False
    return not getattr(text_config(base_model), "is_encoder_decoder", False) and not bidirectional(base_model)


def check_setup(peft_model) -> None:
    """Refuse, when an adapter is set up, a prefix adapter that fastprompt's path cannot run exactly on the
    model (a hybrid model's recurrent layers, a cache of the model's own, another number of layers):
    :class:`~fastprompt.prompt_once.prefix_kv.PrefixTuningError` with the reason, instead of an error at
    the first forward."""
    base_model = peft_model.base_model  # a prompt-learning model's base model is the model itself
    for name, config in getattr(peft_model, "peft_config", {}).items():
        if takes_prefix_path(base_model, config):
            reason = prefix_kv.unsupported_reason(base_model, prefix_kv.PrefixShape.of(config))
            if reason is not None:
                raise prefix_kv.PrefixTuningError(
                    f"prefix tuning cannot run on this model (adapter {name!r}): {reason}"
                )


def wrap_setup_prompt_encoder(original):
    """``PeftModel._setup_prompt_encoder`` under ``patch_peft()``: for a prefix adapter, PEFT's refusal under
    gradient checkpointing lifted (fastprompt's path runs under it) and :func:`check_setup`'s refusal."""

    @functools.wraps(original)
    def _setup_prompt_encoder(self, adapter_name):
        config = self.peft_config.get(adapter_name)
        if not takes_prefix_path(self.base_model, config):
            return original(self, adapter_name)
        with checkpointing_allowed(self.base_model, config):
            result = original(self, adapter_name)
        check_setup(self)
        return result

    _setup_prompt_encoder.__fastprompt_original__ = original
    return _setup_prompt_encoder


def _shape(peft_model, names) -> prefix_kv.PrefixShape:
    shapes = {prefix_kv.PrefixShape.of(peft_model.peft_config[name]) for name in names}
    if len(shapes) > 1:
        raise ValueError(f"adapter_names mixes prefix adapters of different layouts: {sorted(shapes)}")
    return shapes.pop()


def check_model(peft_model, config) -> None:
    """Raise :class:`~fastprompt.prompt_once.prefix_kv.PrefixTuningError` where the model's cache cannot
    hold the prefix exactly (a hybrid model, a cache of the model's own, another number of layers)."""
    reason = prefix_kv.unsupported_reason(peft_model.get_base_model(), prefix_kv.PrefixShape.of(config))
    if reason is not None:
        raise prefix_kv.PrefixTuningError(f"prefix tuning cannot run on this model: {reason}")


def batch_cache(peft_model, rows: RowAdapters | None, batch_size: int):
    """The model's own cache holding each row's prefix: the encoder run once per adapter."""
    names = (peft_model.active_adapter,) if rows is None else rows.names
    shape = _shape(peft_model, names)
    check_model(peft_model, peft_model.peft_config[names[0]])
    dtype = peft_model.base_model_torch_dtype
    outputs = []
    for name in names:
        config = peft_model.peft_config[name]
        encoder = peft_model.prompt_encoder[name]
        outputs.append(
            prefix_kv.encoder_output(encoder, shape, inference_mode=config.inference_mode, dtype=dtype)
        )
    flat = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)  # [K, N, F]
    keys, values = prefix_kv.layer_keys_values(flat, shape)
    base_model = peft_model.get_base_model()
    device = _input_device(base_model)
    index = None if rows is None else torch.tensor(rows.table_index, dtype=torch.int64, device=device)
    if device is not None:
        keys = [k.to(device) for k in keys]
        values = [v.to(device) for v in values]
    return prefix_kv.prefix_cache(base_model, keys, values, index, batch_size)


def _input_device(base_model):
    embeddings = base_model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    return None if weight is None else weight.device


def _batch_size(input_ids, inputs_embeds) -> int:
    if input_ids is not None:
        return input_ids.shape[0]
    if inputs_embeds is not None:
        return inputs_embeds.shape[0]
    raise ValueError("prefix tuning needs input_ids or inputs_embeds")


def _pop_extras(kwargs: dict) -> object:
    """Take fastprompt's keywords out of a forward call: ``adapter_names`` (returned) and
    ``share_prompt_prefix`` (checked; a prefix is always put in once per adapter per batch)."""
    if SHARE_PROMPT_PREFIX in kwargs:
        check_request(kwargs.pop(SHARE_PROMPT_PREFIX))
    return pop_adapter_names(kwargs)


def _packed_rows(peft_model, input_ids, inputs_embeds, attention_mask, kwargs: dict, labels, *, task: str):
    """The call's packed rows (None: an ordinary batch). Packed rows are run for CAUSAL_LM only."""
    if input_ids is None and inputs_embeds is None:
        return None
    config = text_config(peft_model.get_base_model())
    pad_token_id = getattr(config, "pad_token_id", None) if input_ids is not None else None
    ids = input_ids if input_ids is not None else torch.zeros(inputs_embeds.shape[:2], dtype=torch.int64)
    found = packed.find_packed_rows(
        ids, kwargs.get("position_ids"), attention_mask, labels=labels, pad_token_id=pad_token_id
    )
    if found is not None and task != "CAUSAL_LM":
        raise prefix_kv.PrefixTuningError(
            "packed rows (position_ids that restart inside a row, no attention_mask) with a prefix-tuning "
            f"adapter are supported for CAUSAL_LM, not {task}: PEFT would show the prefix once per row and "
            "let the documents attend to each other. Pass one document per row with an attention_mask."
        )
    return found


def _prefixed_mask(attention_mask, batch_size: int, n: int):
    """PEFT's ``cat(ones(B, N), mask)`` (float32 ones)."""
    if attention_mask is None:
        return None
    prefix = torch.ones(batch_size, n).to(attention_mask.device)
    return torch.cat((prefix, attention_mask), dim=1)


def _forward(
    peft_model, args: dict, kwargs: dict, *, remove_token_type_ids: bool, target_keys=("labels",), task: str
):
    config = peft_model.active_peft_config
    input_ids, inputs_embeds = args.get("input_ids"), args.get("inputs_embeds")
    batch_size = _batch_size(input_ids, inputs_embeds)
    adapter_names = _pop_extras(kwargs)
    rows = rows_for_prefix_adapters(peft_model, adapter_names, batch_size)
    if rows is not None and input_ids is None:
        raise ValueError("adapter_names with a prefix-tuning adapter needs input_ids")
    n = config.num_virtual_tokens
    found = _packed_rows(
        peft_model,
        input_ids,
        inputs_embeds,
        args.get("attention_mask"),
        kwargs,
        args.get("labels"),
        task=task,
    )
    if found is not None:
        return _packed_forward(peft_model, args, kwargs, found, rows, n)
    peft_model._adjust_prompt_learning_kwargs(
        config, kwargs=kwargs, remove_token_type_ids=remove_token_type_ids
    )
    kwargs.update(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=_prefixed_mask(args.get("attention_mask"), batch_size, n),
        output_attentions=args.get("output_attentions"),
        output_hidden_states=args.get("output_hidden_states"),
        return_dict=args.get("return_dict"),
        **{key: args.get(key) for key in target_keys},
    )
    cache = batch_cache(peft_model, rows, batch_size)
    base_model = peft_model.get_base_model()
    return prefix_kv.run_on_prefix(base_model, peft_model.base_model, cache, kwargs)


def _packed_forward(peft_model, args: dict, kwargs: dict, found, rows: RowAdapters | None, n: int):
    """CAUSAL_LM over packed rows: each document on its own prefix, as if alone
    (:mod:`fastprompt.prompt_once.prefix_packed`)."""
    base_model = peft_model.get_base_model()
    unpacked = prefix_packed.unpack(found, n)
    reason = prefix_packed.why_not_exact(base_model, found, unpacked, n)
    if reason is None:
        reason = packed_forward.why_not_exact(base_model, kwargs)
    if reason is not None:
        raise prefix_kv.PrefixTuningError(
            f"packed rows with a prefix-tuning adapter cannot run exact: {reason}"
        )
    kwargs.pop("position_ids")
    peft_model._adjust_prompt_learning_kwargs(peft_model.active_peft_config, kwargs=kwargs)  # token types
    if rows is not None:
        rows = RowAdapters(rows.names, tuple(rows.table_index[b] for b in unpacked.batch_row), n)
    if "shift_labels" in kwargs:
        kwargs["shift_labels"] = prefix_packed.document_shift_labels(kwargs["shift_labels"], found)
    kwargs.update(
        attention_mask=None,
        use_cache=False,
        output_attentions=args.get("output_attentions"),
        output_hidden_states=args.get("output_hidden_states"),
        return_dict=args.get("return_dict"),
        labels=prefix_packed.document_labels(args.get("labels"), found),
    )
    input_ids, inputs_embeds = args.get("input_ids"), args.get("inputs_embeds")
    embeddings = base_model.get_input_embeddings()

    def call(**call_kwargs):  # the embeddings made inside the call: a reentrant checkpoint's hook sees them
        embeds = embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        return prefix_packed.run_unpacked(
            base_model,
            lambda marker: peft_model.base_model(inputs_embeds=marker, **call_kwargs),
            embeds,
            unpacked,
        )

    cache = batch_cache(peft_model, rows, unpacked.rows)
    output = prefix_kv.run_on_prefix(base_model, call, cache, kwargs)
    if isinstance(output, dict):  # the documents' cache is of another batch than the rows: not handed back
        output = type(output)(**{k: v for k, v in output.items() if k not in CACHE_KEYS})
    return output


def causal_lm_forward(peft_model, args: dict, kwargs: dict):
    """``PeftModelForCausalLM.forward`` for a prefix-tuning adapter (``args``: its named parameters,
    ``kwargs``: its ``**kwargs``): token type ids dropped with PEFT's warning, labels unchanged (the
    logits cover the L tokens only)."""
    return _forward(peft_model, args, kwargs, remove_token_type_ids=True, task="CAUSAL_LM")


def token_cls_forward(peft_model, args: dict, kwargs: dict):
    """``PeftModelForTokenClassification.forward`` for a prefix-tuning adapter on a decoder model."""
    return _forward(peft_model, args, kwargs, remove_token_type_ids=False, task="TOKEN_CLS")


def seq_cls_forward(peft_model, args: dict, kwargs: dict):
    """``PeftModelForSequenceClassification.forward`` for a prefix-tuning adapter on a decoder model."""
    return _forward(peft_model, args, kwargs, remove_token_type_ids=False, task="SEQ_CLS")


# fastprompt's forward implementation name (``peft_forward``) -> the prefix-tuning forward that replaces it.
# The encoder-decoder and encoder task classes (Seq2Seq, question answering, feature extraction) keep
# PEFT's own prefix path.
FORWARDS = {
    "causal_lm_forward": causal_lm_forward,
    "seq_cls_forward": seq_cls_forward,
    "token_cls_forward": token_cls_forward,
}


def forward_for(peft_model, impl):
    """The prefix-tuning forward for fastprompt's forward ``impl`` where the active adapter is prefix
    tuning and the model is a decoder with causal attention (else None: PEFT's own path, for encoder-decoder
    and encoder models)."""
    if not prefix_active(peft_model):
        return None
    forward = FORWARDS.get(getattr(impl, "__name__", ""))
    base_model = peft_model.get_base_model()
    if forward is None or getattr(text_config(base_model), "is_encoder_decoder", False):
        return None
    if bidirectional(base_model):  # an encoder (BERT, RoBERTa, ...): PEFT's own prefix path
        return None
    return forward


# ---------------------------------------------------------------------------------------------- generate

_STATE = "_fastprompt_prefix_generation"


def _find_cache(model_kwargs: dict):
    for key in CACHE_KEYS:
        if model_kwargs.get(key, None) is not None:
            return key, model_kwargs[key]
    return None, None


def causal_lm_generate(peft_model, original, args: tuple, kwargs: dict, reuse):
    """``PeftModelForCausalLM.generate`` for a prefix-tuning adapter; ``adapter_names`` gives each row its
    own prefix adapter. ``reuse_prompt_kv`` is checked and changes nothing (the prefix is put in the
    cache once per call)."""
    if reuse is not None and not isinstance(reuse, bool):
        raise TypeError(f"reuse_prompt_kv must be True, False or None, got {reuse!r}.")
    kwargs = dict(kwargs)
    adapter_names = pop_adapter_names(kwargs)
    rows = None
    if adapter_names is not None:
        input_ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or kwargs.get("inputs_embeds") is not None:
            raise ValueError(
                "generate(adapter_names=...) with prefix tuning needs input_ids ([B, L] token ids)"
            )
        rows = rows_for_prefix_adapters(peft_model, adapter_names, input_ids.shape[0])
    check_model(peft_model, peft_model.active_peft_config)
    if getattr(peft_model, _STATE, None) is not None:
        raise RuntimeError("generate() is already running on this model (re-entrant call).")
    setattr(peft_model, _STATE, {"rows": rows})
    try:
        return original(peft_model, *args, **kwargs)
    finally:
        peft_model.__dict__.pop(_STATE, None)


def _generation_rows(peft_model, batch_size: int) -> RowAdapters | None:
    state = getattr(peft_model, _STATE, None)
    rows = None if state is None else state["rows"]
    if rows is not None and batch_size != len(rows.table_index):  # beams / num_return_sequences
        rows = rows.repeat_rows(batch_size // len(rows.table_index))
    return rows


def _fill(cache, prefix) -> None:
    """Write a prefix cache's layers into ``generate``'s empty cache (layer by layer, by its ``update``)."""
    for i, layer in enumerate(prefix.layers):
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel():
            cache.update(keys, layer.values, i)


def causal_lm_prepare_inputs_for_generation(peft_model, args: tuple, kwargs: dict) -> dict:
    """``PeftModelForCausalLM.prepare_inputs_for_generation`` for a prefix-tuning adapter.

    At the prefill (the cache ``generate`` made is empty) the prefix goes into that cache, once; every
    later step feeds the new token on the cache the model extended. Without a cache (``use_cache=False``)
    every step runs the whole sequence on a fresh prefix cache. The mask gets N ones in front, the
    ``position_ids`` ``generate`` built from the mask are shifted by N (PEFT's), and ``cache_position``
    (transformers < 5.24) counts the prefix.
    """
    config = peft_model.active_peft_config
    n = config.num_virtual_tokens
    model_kwargs = peft_model.base_model_prepare_inputs_for_generation(*args, **kwargs)
    input_ids = model_kwargs.get("input_ids")
    if input_ids is None:
        raise ValueError("generate() with a prefix-tuning adapter needs input_ids, not inputs_embeds")
    batch_size = input_ids.shape[0]
    key, cache = _find_cache(model_kwargs)
    if cache is None or model_kwargs.get("use_cache") is False:
        # use_cache=False: the whole sequence on a fresh prefix cache (the model hands back the cache it
        # was given, and generate would pass it on to the next step)
        model_kwargs.pop(key, None)
        base_model = peft_model.get_base_model()
        rows = _generation_rows(peft_model, batch_size)
        model_kwargs[cache_argument(base_model)] = batch_cache(peft_model, rows, batch_size)
    elif not cache.get_seq_length():  # the prefill: the prefix goes into generate's own cache, once
        _fill(cache, batch_cache(peft_model, _generation_rows(peft_model, batch_size), batch_size))
    mask = kwargs.get("attention_mask")  # generate's 2-D mask over the tokens so far (a 4-D one: rebuilt)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        model_kwargs["attention_mask"] = _prefixed_mask(mask, mask.shape[0], n).to(input_ids.device)
    if model_kwargs.get("position_ids") is not None:
        model_kwargs["position_ids"] = model_kwargs["position_ids"] + n
    if model_kwargs.get("cache_position") is not None:
        model_kwargs["cache_position"] = model_kwargs["cache_position"] + n
    if model_kwargs.get("token_type_ids") is not None:
        peft_model._adjust_prompt_learning_kwargs(config, kwargs=model_kwargs)
    return model_kwargs
