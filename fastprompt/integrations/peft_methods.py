"""The fastprompt versions of PEFT's task-model methods, as wrappers around PEFT's originals.

- ``forward`` (every task), ``prepare_inputs_for_generation`` (CausalLM) and ``generate`` (Seq2Seq) take
  the fused path when the active adapter is PROMPT_TUNING and ``input_ids`` (not ``inputs_embeds``) is
  given; otherwise they call PEFT's own method unchanged (LoRA, prefix tuning, p-tuning, user-supplied
  ``inputs_embeds``, ...).
- They act only while ``patch_peft()`` is in effect or on models moved to a :class:`FastPromptModel`
  class by ``accelerate``; a bound method left behind elsewhere (PEFT's ``disable_adapter`` stores some
  in the instance) then defers to PEFT.

Each wrapper keeps PEFT's original as ``__fastprompt_original__`` and ``__wrapped__`` (so
``inspect.signature`` shows PEFT's signature, which transformers' ``Trainer`` reads).
"""

from __future__ import annotations

import functools
import inspect

from ..config import PROMPT_TUNING
from . import peft_forward, peft_generate
from .adapter_batches import ADAPTER_NAMES

# PEFT task class name -> the prompt-tuning forward that replaces its ``forward``
FORWARDS = {
    "PeftModelForCausalLM": peft_forward.causal_lm_forward,
    "PeftModelForSeq2SeqLM": peft_forward.seq2seq_forward,
    "PeftModelForSequenceClassification": peft_forward.seq_cls_forward,
    "PeftModelForTokenClassification": peft_forward.token_cls_forward,
    "PeftModelForQuestionAnswering": peft_forward.question_answering_forward,
    "PeftModelForFeatureExtraction": peft_forward.feature_extraction_forward,
}

_state = {"patched": False}


class FastPromptModel:
    """Marker base of the classes ``accelerate`` moves models to."""

    _fastprompt_base: type


def set_patched(flag: bool) -> None:
    """Called by ``patch_peft`` / ``unpatch_peft``."""
    _state["patched"] = flag


def is_patched() -> bool:
    """Whether ``patch_peft()`` is in effect."""
    return _state["patched"]


def enabled(peft_model) -> bool:
    """The wrappers act only on patched classes or accelerated models."""
    return _state["patched"] or isinstance(peft_model, FastPromptModel)


def _prompt_tuning_active(peft_model) -> bool:
    try:
        config = peft_model.peft_config[peft_model.active_adapter]
    except (AttributeError, KeyError, TypeError):
        return False
    return getattr(config, "peft_type", None) == PROMPT_TUNING and enabled(peft_model)


def original_of(func):
    """PEFT's function behind a fastprompt wrapper (``func`` itself if it is not one)."""
    return getattr(func, "__fastprompt_original__", func)


def _wrap_forward(original, impl):
    original = original_of(original)
    signature = inspect.signature(original)
    var_keyword = next(
        (p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
    )

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if _prompt_tuning_active(self):
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError:
                return original(self, *args, **kwargs)
            bound.apply_defaults()
            named = dict(bound.arguments)
            extra = dict(named.pop(var_keyword, {}) or {}) if var_keyword else {}
            input_ids = named.get("input_ids")
            if named.get("inputs_embeds") is None and getattr(input_ids, "dim", None) is not None:
                return impl(self, named, extra)
            if extra.get(ADAPTER_NAMES) is not None:
                raise ValueError(
                    "adapter_names (one prompt-tuning adapter per batch row) needs input_ids and no "
                    "inputs_embeds: the prompts are put before the embeddings of input_ids"
                )
        return original(self, *args, **kwargs)

    forward.__fastprompt_original__ = original
    forward.__signature__ = _with_adapter_names(signature)
    return forward


def _with_adapter_names(signature: inspect.Signature) -> inspect.Signature:
    """PEFT's signature plus a keyword-only ``adapter_names`` before ``**kwargs`` (Trainer reads the
    signature to decide which dataset columns to keep)."""
    params = list(signature.parameters.values())
    if ADAPTER_NAMES in signature.parameters:
        return signature
    extra = inspect.Parameter(ADAPTER_NAMES, inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    return signature.replace(parameters=[*params[:at], extra, *params[at:]])


def _wrap_prepare_inputs_for_generation(original):
    original = original_of(original)

    @functools.wraps(original)
    def prepare_inputs_for_generation(self, *args, task_ids=None, **kwargs):
        if _prompt_tuning_active(self) and kwargs.get("inputs_embeds", None) is None:
            return peft_generate.causal_lm_prepare_inputs_for_generation(self, args, kwargs)
        return original(self, *args, task_ids=task_ids, **kwargs)

    prepare_inputs_for_generation.__fastprompt_original__ = original
    return prepare_inputs_for_generation


def _wrap_seq2seq_generate(original):
    original = original_of(original)

    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        if (
            not args
            and _prompt_tuning_active(self)
            and "input_ids" in kwargs
            and kwargs.get("inputs_embeds", None) is None
        ):
            return peft_generate.seq2seq_generate(self, kwargs)
        if kwargs.get(ADAPTER_NAMES) is not None and _prompt_tuning_active(self):
            raise ValueError(
                "generate(adapter_names=...) needs input_ids as a keyword and no inputs_embeds: the "
                "prompts are put before the embeddings of input_ids"
            )
        return original(self, *args, **kwargs)

    generate.__fastprompt_original__ = original
    return generate


def task_methods(cls_name: str, cls: type) -> dict:
    """{attribute: wrapper} for PEFT class ``cls`` (only the attributes that class itself defines)."""
    methods = {}
    if cls_name in FORWARDS:
        methods["forward"] = _wrap_forward(cls.__dict__["forward"], FORWARDS[cls_name])
    if cls_name == "PeftModelForCausalLM":
        methods["prepare_inputs_for_generation"] = _wrap_prepare_inputs_for_generation(
            cls.__dict__["prepare_inputs_for_generation"]
        )
    if cls_name == "PeftModelForSeq2SeqLM":
        methods["generate"] = _wrap_seq2seq_generate(cls.__dict__["generate"])
    return methods
