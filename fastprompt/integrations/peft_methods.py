"""The fastprompt versions of PEFT's task-model methods, as wrappers around PEFT's originals.

- ``forward`` (every task), ``prepare_inputs_for_generation`` (CausalLM) and ``generate`` (Seq2Seq) take
  the fused path when the active adapter is PROMPT_TUNING, P_TUNING or MULTITASK_PROMPT_TUNING and
  ``input_ids`` (not ``inputs_embeds``) is given; otherwise they call PEFT's own method unchanged (LoRA,
  prefix tuning, CPT, user-supplied ``inputs_embeds``, ...).
- On the fused path the inputs are checked first (``input_checks.check_prompt_inputs``): wrong dtypes,
  ranks, an empty batch or a mask of another shape raise an error naming ``input_ids`` / ``attention_mask``.
- They act only while ``patch_peft()`` is in effect or on models moved to a :class:`FastPromptModel`
  class by ``accelerate``, and only with a tested PEFT version (``peft_version``); a bound method left
  behind elsewhere then defers to PEFT.
- ``forward`` and ``prepare_inputs_for_generation`` sit on the classes as :class:`PatchedMethod`, a data
  descriptor: PEFT's ``disable_adapter()`` stores those two on the instance as bound methods of the class
  as it was then, and the descriptor sees through such stale entries (no heap walk needed). Anything
  else set on the instance (accelerate's autocast wrapper, a dispatch hook, a user's wrapper) is called,
  exactly as on PEFT's own classes.

Each wrapper keeps PEFT's original as ``__fastprompt_original__`` and ``__wrapped__`` (so
``inspect.signature`` shows PEFT's signature, which transformers' ``Trainer`` reads), and itself as
``__fastprompt_wrapper__`` (``functools.wraps`` copies that attribute onto a wrapper of the wrapper, where
it then names another function: :func:`is_fastprompt_wrapper` tells them apart by identity).
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
import weakref

from ..prompt_once.policy import SHARE_PROMPT_PREFIX, check_request
from ..prompted_embeds.config import PROMPT_TUNING  # noqa: F401 - re-exported (peft_loading)
from . import peft_forward, peft_generate, peft_prefix
from .adapter_batches import ADAPTER_NAMES
from .input_checks import check_prompt_inputs
from .peft_prompt_methods import forward_applies, prompt_method
from .peft_version import fused_path_allowed

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
    """The wrappers act only on patched classes or accelerated models, with a tested PEFT version."""
    return (_state["patched"] or isinstance(peft_model, FastPromptModel)) and fused_path_allowed()


def _prompt_tuning_active(peft_model) -> bool:
    try:
        config = peft_model.peft_config[peft_model.active_adapter]
    except (AttributeError, KeyError, TypeError):
        return False
    return prompt_method(config) and enabled(peft_model)


def original_of(func):
    """PEFT's function behind a fastprompt wrapper (``func`` itself if it is not one)."""
    return getattr(func, "__fastprompt_original__", func)


def is_fastprompt_wrapper(func) -> bool:
    """Whether ``func`` is one of fastprompt's method wrappers itself (not a wrapper made around one with
    ``functools.wraps``, which copies its attributes)."""
    return getattr(func, "__fastprompt_wrapper__", None) is func


def _mark_wrapper(wrapper, original):
    wrapper.__fastprompt_original__ = original
    wrapper.__fastprompt_wrapper__ = wrapper
    return wrapper


class WrappedBeforeFastpromptWarning(UserWarning):
    """A wrapper set on a model's instance (accelerate's autocast, a hook) calls PEFT's own method,
    captured before the model was accelerated or ``patch_peft()`` ran: that wrapper keeps working, but the
    fused path is not taken."""


_warned: weakref.WeakSet = weakref.WeakSet()  # wrappers already warned about


def _inner_callables(value, limit: int = 64):
    """``value``, then what it wraps: ``__func__`` of bound methods, ``func`` of partials and the
    ``__wrapped__`` chain that ``functools.wraps`` / ``update_wrapper`` leave (at most ``limit`` steps)."""
    for _ in range(limit):
        if value is None:
            return
        yield value
        if isinstance(value, types.MethodType):
            value = value.__func__
        elif isinstance(value, functools.partial) and not hasattr(value, "__wrapped__"):
            value = value.func
        else:
            value = getattr(value, "__wrapped__", None)


class PatchedMethod:
    """A method on a PEFT class that wins over stale copies of it in the instance dict.

    PEFT's ``disable_adapter()`` runs ``old = self.forward; self.forward = base_model.forward; ...;
    self.forward = old``, which leaves a bound method of the class *as it was then* in the instance
    dict, hiding any later class method. As a data descriptor (it defines ``__set__``), this object is
    looked up before the instance dict. The rule: an instance entry is stale exactly when it is a bound
    method of the same instance whose function IS a function this method has been on a class as: PEFT's
    original, a fastprompt wrapper of it (:func:`is_fastprompt_wrapper`) or this descriptor. Such an entry
    calls the class method as it was, so it is passed over (the current class method is returned); any
    other entry, including a wrapper around one of those functions (accelerate's autocast and fp32
    conversion, ``accelerate.hooks.add_hook_to_module``, ``base_model.forward`` inside
    ``disable_adapter()``, a user's function or ``MethodType``), is returned and called, exactly as on
    PEFT's own classes. Assigning a stale value removes the instance entry instead of storing it, so
    ``disable_adapter()`` under fastprompt leaves nothing behind (and ``accelerate``'s ``unwrap_model``
    putting the unwrapped method back leaves the class method in force).

    A wrapper that was made around PEFT's original *before* the model was accelerated or ``patch_peft()``
    ran calls PEFT's code, not the fused path: it is still called, with one
    :class:`WrappedBeforeFastpromptWarning` (accelerate or patch first, then prepare / wrap).

    On the class (``cls.forward``) it is itself, callable as the function, so code that saves
    ``cls.forward`` and assigns it back later restores it exactly.
    """

    def __init__(self, name: str, function):
        self.name = name
        self.function = function
        self.__fastprompt_original__ = original_of(function)
        functools.update_wrapper(self, function)  # __wrapped__, __doc__, ...: inspect.signature works

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)

    def _is_class_function(self, func) -> bool:
        """``func`` is this method as some class carried it: PEFT's original or a fastprompt wrapper of it."""
        return (
            func is self
            or func is self.__fastprompt_original__
            or (is_fastprompt_wrapper(func) and func.__fastprompt_original__ is self.__fastprompt_original__)
        )

    def _is_stale(self, instance, value) -> bool:
        return (
            isinstance(value, types.MethodType)
            and value.__self__ is instance
            and self._is_class_function(value.__func__)
        )

    def _warn_if_it_bypasses(self, instance, value) -> None:
        """One warning when ``value`` (kept) ends in PEFT's original without passing a fastprompt wrapper."""
        try:
            if value in _warned:
                return
        except TypeError:  # not weak-referenceable: check (cheap) every time
            pass
        for inner in _inner_callables(value):
            func = inner.__func__ if isinstance(inner, types.MethodType) else inner
            if func is self or is_fastprompt_wrapper(func):
                return
            if func is self.__fastprompt_original__:
                break
        else:
            return
        if not _prompt_tuning_active(instance):
            return
        try:
            _warned.add(value)
        except TypeError:
            pass
        wrapper = getattr(value, "__qualname__", type(value).__name__)
        warnings.warn(
            f"{type(instance).__name__}.{self.name} is set on this model to {wrapper}, which calls PEFT's "
            f"own {self.name} captured before fastprompt.accelerate / patch_peft: the wrapper is called but "
            "the fused prompt concat is not used. Accelerate the model (or call patch_peft()) before "
            "accelerator.prepare / dispatch_model / wrapping its methods.",
            WrappedBeforeFastpromptWarning,
            stacklevel=3,
        )

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__.get(self.name, self)
        if value is self or self._is_stale(instance, value):
            return types.MethodType(self.function, instance)
        self._warn_if_it_bypasses(instance, value)
        return value

    def __set__(self, instance, value) -> None:
        if self._is_stale(instance, value):
            instance.__dict__.pop(self.name, None)
        else:
            instance.__dict__[self.name] = value

    def __delete__(self, instance) -> None:
        if instance.__dict__.pop(self.name, self) is self:
            raise AttributeError(self.name)


def _wrap_forward(original, impl):
    original = original_of(original)
    signature = inspect.signature(original)
    var_keyword = next(
        (p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
    )

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        prefix = peft_prefix.forward_for(self, impl) if enabled(self) else None
        if prefix is not None:  # prefix tuning: the prefix goes into the model's cache
            bound = _bind(signature, var_keyword, self, args, kwargs)
            return original(self, *args, **kwargs) if bound is None else prefix(self, *bound)
        if _prompt_tuning_active(self) and forward_applies(self, impl):
            bound = _bind(signature, var_keyword, self, args, kwargs)
            if bound is None:
                return original(self, *args, **kwargs)
            named, extra = bound
            input_ids = named.get("input_ids")
            if named.get("inputs_embeds") is None and input_ids is not None:
                check_prompt_inputs(input_ids, named.get("attention_mask"))
                return impl(self, named, extra)
            if extra.get(ADAPTER_NAMES) is not None:
                raise ValueError(
                    "adapter_names (one prompt-tuning adapter per batch row) needs input_ids and no "
                    "inputs_embeds: the prompts are put before the embeddings of input_ids"
                )
        if SHARE_PROMPT_PREFIX in kwargs:  # PEFT's own path: nothing to share
            share = kwargs.pop(SHARE_PROMPT_PREFIX)
            check_request(share)
            if share:
                raise ValueError(
                    "share_prompt_prefix=True cannot apply: the prompt-tuning fused path needs input_ids "
                    "and no inputs_embeds (or the active adapter is not prompt tuning)"
                )
        return original(self, *args, **kwargs)

    _mark_wrapper(forward, original)
    forward.__signature__ = _with_adapter_names(signature)
    return forward


def _bind(signature, var_keyword, self, args, kwargs):
    """(named parameters with defaults, the ``**kwargs``) of a call of PEFT's forward, or None where the
    call does not fit its signature (PEFT's own forward then raises its error)."""
    try:
        bound = signature.bind(self, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    named = dict(bound.arguments)
    extra = dict(named.pop(var_keyword, {}) or {}) if var_keyword else {}
    return named, extra


def _with_adapter_names(signature: inspect.Signature) -> inspect.Signature:
    """PEFT's signature plus keyword-only ``adapter_names`` and ``share_prompt_prefix`` before
    ``**kwargs`` (Trainer reads the signature to decide which dataset columns to keep)."""
    params = list(signature.parameters.values())
    names = [name for name in (ADAPTER_NAMES, SHARE_PROMPT_PREFIX) if name not in signature.parameters]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in names]
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    return signature.replace(parameters=[*params[:at], *extra, *params[at:]])


def _wrap_prepare_inputs_for_generation(original):
    original = original_of(original)

    @functools.wraps(original)
    def prepare_inputs_for_generation(self, *args, task_ids=None, **kwargs):
        if peft_prefix.prefix_active(self) and enabled(self):
            return peft_prefix.causal_lm_prepare_inputs_for_generation(self, args, kwargs)
        if _prompt_tuning_active(self) and kwargs.get("inputs_embeds", None) is None:
            return peft_generate.causal_lm_prepare_inputs_for_generation(self, args, kwargs)
        return original(self, *args, task_ids=task_ids, **kwargs)

    _mark_wrapper(prepare_inputs_for_generation, original)
    return prepare_inputs_for_generation


def _wrap_seq2seq_generate(original):
    original = original_of(original)

    @functools.wraps(original)
    def generate(self, *args, reuse_prompt_kv=None, **kwargs):
        if reuse_prompt_kv is not None and not isinstance(reuse_prompt_kv, bool):
            raise TypeError(f"reuse_prompt_kv must be True, False or None, got {reuse_prompt_kv!r}.")
        if reuse_prompt_kv:
            raise ValueError(
                "reuse_prompt_kv=True applies to CausalLM generation only: a Seq2Seq model's prompt is in "
                "the encoder input, which generate() encodes once anyway. Leave it out (or pass False)."
            )
        if (
            not args
            and _prompt_tuning_active(self)
            and "input_ids" in kwargs
            and kwargs.get("inputs_embeds", None) is None
        ):
            check_prompt_inputs(kwargs["input_ids"], kwargs.get("attention_mask"))
            return peft_generate.seq2seq_generate(self, kwargs)
        if kwargs.get(ADAPTER_NAMES) is not None and _prompt_tuning_active(self):
            raise ValueError(
                "generate(adapter_names=...) needs input_ids as a keyword and no inputs_embeds: the "
                "prompts are put before the embeddings of input_ids"
            )
        return original(self, *args, **kwargs)

    _mark_wrapper(generate, original)
    return generate


def _wrap_causal_lm_generate(original):
    original = original_of(original)

    @functools.wraps(original)
    def generate(self, *args, reuse_prompt_kv=None, **kwargs):
        disabled = getattr(self, "_adapters_disabled", False)
        if peft_prefix.prefix_active(self) and enabled(self) and not disabled:
            return peft_prefix.causal_lm_generate(self, original, args, kwargs, reuse_prompt_kv)
        if (
            _prompt_tuning_active(self)
            and not getattr(self, "_adapters_disabled", False)
            and kwargs.get("inputs_embeds", None) is None
        ):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is not None:
                mask = kwargs.get("attention_mask", None)
                two_d_mask = mask if getattr(mask, "dim", lambda: 2)() == 2 else None  # 4-D masks: as given
                check_prompt_inputs(input_ids, two_d_mask)
            return peft_generate.causal_lm_generate(self, original, args, kwargs, reuse_prompt_kv)
        if kwargs.get(ADAPTER_NAMES) is not None and kwargs.get("inputs_embeds") is not None:
            raise ValueError(
                "generate(adapter_names=...) needs input_ids and no inputs_embeds: the prompts are put "
                "before the embeddings of input_ids"
            )
        return original(self, *args, **kwargs)  # no virtual tokens here: nothing to reuse

    _mark_wrapper(generate, original)
    return generate


def task_methods(cls_name: str, cls: type) -> dict:
    """{attribute: wrapper} for PEFT class ``cls`` (only the attributes that class itself defines).

    ``forward`` and ``prepare_inputs_for_generation`` come as :class:`PatchedMethod`, ``generate`` as a
    plain function."""
    methods = {}
    if cls_name in FORWARDS:
        forward = _wrap_forward(cls.__dict__["forward"], FORWARDS[cls_name])
        methods["forward"] = PatchedMethod("forward", forward)
    if cls_name == "PeftModelForCausalLM":
        methods["prepare_inputs_for_generation"] = PatchedMethod(
            "prepare_inputs_for_generation",
            _wrap_prepare_inputs_for_generation(cls.__dict__["prepare_inputs_for_generation"]),
        )
        methods["generate"] = _wrap_causal_lm_generate(cls.__dict__["generate"])
    if cls_name == "PeftModelForSeq2SeqLM":
        methods["generate"] = _wrap_seq2seq_generate(cls.__dict__["generate"])
    return methods
