"""``accelerate``, ``get_peft_model``, ``patch_peft`` / ``unpatch_peft``: putting fastprompt's method
wrappers (``peft_methods``, ``peft_loading``) on PEFT models.

``accelerate(model)`` moves one model to a subclass of its class that carries the wrappers
(``isinstance(model, PeftModel)`` stays true; save / load / deepcopy / pickle / ``torch.save`` work, also
into a fresh process: such a model pickles as "the fastprompt class of <PEFT class>" and the class is
rebuilt on load). ``patch_peft()`` puts them on PEFT's classes themselves, so every model built or
loaded afterwards is covered whatever the import order; ``unpatch_peft()`` puts PEFT's original class
attributes back, exactly. Neither walks the heap: existing models are covered because ``forward`` /
``prepare_inputs_for_generation`` are data descriptors (``peft_methods.PatchedMethod``) that see
through the stale bound methods PEFT's ``disable_adapter()`` leaves on instances.

With a PEFT outside the tested range (``peft_version``) both leave PEFT alone, after one warning.
"""

from __future__ import annotations

import copyreg
import threading

from ..prompt_once.policy import check_request, set_global_default, set_model_default
from .peft_loading import wrap_from_pretrained, wrap_load_adapter
from .peft_methods import FORWARDS, FastPromptModel, original_of, set_patched, task_methods
from .peft_prefix import check_setup, checkpointing_allowed, is_prefix, wrap_setup_prompt_encoder
from .peft_prompt_methods import prompt_method
from .peft_version import fused_path_allowed

__all__ = ["accelerate", "get_peft_model", "patch_peft", "unpatch_peft"]

_lock = threading.RLock()
_MISSING = object()
_patched: dict = {}  # (class, attribute name) -> the class __dict__ entry before patching (or _MISSING)
_fast_classes: dict = {}


def _peft_classes() -> dict:
    import peft.peft_model as peft_model_module

    names = ["PeftModel", *FORWARDS]
    return {name: getattr(peft_model_module, name) for name in names}


# ------------------------------------------------------------------------------------ public API


def patch_peft(*, share_prompt_prefix=_MISSING) -> None:
    """Route every PEFT prompt-tuning model through ``prompt_concat`` (idempotent).

    Patches PEFT's classes (not module attributes), so models built or loaded afterwards by any route
    (``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModel...``, imported before or after)
    use the fused op, and so do existing models of those classes. Other adapter types are untouched.

    ``share_prompt_prefix``: the default of every model without one of its own (see :func:`accelerate`);
    not given: left as it is (None at first).
    """
    if share_prompt_prefix is not _MISSING:
        set_global_default(share_prompt_prefix)
    with _lock:
        if _patched or not fused_path_allowed():
            return
        classes = _peft_classes()
        for name, cls in classes.items():
            methods = task_methods(name, cls) if name != "PeftModel" else {}
            if name == "PeftModel":
                methods["load_adapter"] = wrap_load_adapter(cls.__dict__["load_adapter"])
                methods["from_pretrained"] = wrap_from_pretrained(cls.__dict__["from_pretrained"])
                setup = cls.__dict__["_setup_prompt_encoder"]  # prefix tuning: checked, checkpointing allowed
                methods["_setup_prompt_encoder"] = wrap_setup_prompt_encoder(setup)
            for attribute, wrapper in methods.items():
                _patched[(cls, attribute)] = cls.__dict__.get(attribute, _MISSING)
                setattr(cls, attribute, wrapper)
        set_patched(True)


def unpatch_peft() -> None:
    """Put PEFT's original class attributes back, exactly, and the global ``share_prompt_prefix``
    default to None (idempotent)."""
    with _lock:
        for (cls, attribute), original in _patched.items():
            if original is _MISSING:
                if attribute in cls.__dict__:
                    delattr(cls, attribute)
            else:
                setattr(cls, attribute, original)
        _patched.clear()
        set_patched(False)
        set_global_default(None)


def _fast_class(cls: type) -> type:
    """The subclass of PEFT model class ``cls`` that carries the fastprompt wrappers (cached)."""
    with _lock:
        fast = _fast_classes.get(cls)
        if fast is not None:
            return fast
        classes = _peft_classes()
        namespace = {"__module__": __name__, "_fastprompt_base": cls, "__reduce_ex__": _reduce_ex}
        for name, peft_cls in classes.items():
            if name == "PeftModel" or not issubclass(cls, peft_cls):
                continue
            for attribute, wrapper in task_methods(name, peft_cls).items():
                if original_of(getattr(cls, attribute)) is not original_of(getattr(peft_cls, attribute)):
                    continue  # the user's subclass overrides it: leave theirs
                namespace[attribute] = wrapper
        namespace["load_adapter"] = wrap_load_adapter(cls.load_adapter)
        namespace["_setup_prompt_encoder"] = wrap_setup_prompt_encoder(original_of(cls._setup_prompt_encoder))
        fast = type(f"Fast{cls.__name__}", (FastPromptModel, cls), namespace)
        _fast_classes[cls] = fast
        return fast


def _reduce_ex(self, protocol):
    """``__reduce_ex__`` of the fastprompt classes: pickle as (:func:`_new_fast_model`, PEFT class) plus
    the usual state, so that loading needs only importable names, in any process."""
    func, args, *rest = self._fastprompt_base.__reduce_ex__(self, max(protocol, 2))
    if func is copyreg.__newobj__ and args[:1] == (type(self),):
        func, args = _new_fast_model, (self._fastprompt_base, *args[1:])
    return (func, args, *rest)


def _new_fast_model(base: type, *args):
    """An empty instance of the fastprompt class of PEFT class ``base`` (unpickling fills it in)."""
    fast = _fast_class(base)
    fused_path_allowed()  # the one warning, if this PEFT is untested, comes at load time
    return fast.__new__(fast, *args)


def __getattr__(name: str):
    """``FastPeftModelForCausalLM`` etc. by name (built on first use), for pickles that name the class."""
    if name.startswith("Fast") and name[4:] in FORWARDS:
        return _fast_class(_peft_classes()[name[4:]])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _has_prompt_tuning_adapter(peft_model) -> bool:
    try:
        configs = peft_model.peft_config.values()
    except AttributeError:
        return False
    return any(prompt_method(config) or is_prefix(config) for config in configs)


def accelerate(peft_model, *, share_prompt_prefix=_MISSING):
    """Make ``peft_model`` (a PEFT prompt-tuning model) build its inputs with ``prompt_concat``.

    In place and idempotent; returns the same object. Models that are not prompt tuning, plain
    ``PeftModel`` instances (no task type: PEFT adds no prompts there), and every model when the
    installed PEFT is outside the tested range (after one ``UntestedPeftWarning``) are returned unchanged.

    Args:
        share_prompt_prefix: the model's default for ``forward(..., share_prompt_prefix=...)`` when a call
            does not pass it: None (share where exact and it pays), True (share or raise), False (PEFT's
            path). Not given: the model's default is left as it is (None on a new model).

    Raises:
        TypeError: ``peft_model`` is not a ``peft.PeftModel``, or ``share_prompt_prefix`` is not
            True / False / None.
    """
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"accelerate() expects a peft.PeftModel, got {type(peft_model).__name__}.")
    if share_prompt_prefix is not _MISSING:
        set_model_default(peft_model, share_prompt_prefix)
    if isinstance(peft_model, FastPromptModel) or not _has_prompt_tuning_adapter(peft_model):
        return peft_model
    cls = type(peft_model)
    classes = _peft_classes()
    if not any(issubclass(cls, classes[name]) for name in FORWARDS) or not fused_path_allowed():
        return peft_model
    check_setup(peft_model)  # a prefix adapter fastprompt cannot run: refused here, with the reason
    peft_model.__class__ = _fast_class(cls)
    if getattr(peft_model, "word_embeddings", None) is None:
        # PEFT finds the table by a row count equal to the config's vocab_size; a multimodal config's
        # table may have more rows (Mllama: the image tokens). The model's own input embeddings are it.
        peft_model.word_embeddings = peft_model.get_base_model().get_input_embeddings()
    return peft_model


def get_peft_model(model, peft_config, *args, share_prompt_prefix=_MISSING, **kwargs):
    """``peft.get_peft_model`` then :func:`accelerate`. ``peft_config`` may be fastprompt's or PEFT's.
    ``share_prompt_prefix``: the model's default for ``forward`` (see :func:`accelerate`); not given, the
    model follows ``patch_peft(share_prompt_prefix=...)``'s default, else None.

    Raises:
        ValueError: a prompt-tuning config without a valid ``task_type`` or ``prompt_tuning_init``.
    """
    import peft

    from ..prompted_embeds.config import PromptTuningConfig, check_for_model, to_peft_config

    check_for_model(peft_config)  # a ValueError naming the choices, not PEFT's KeyError: None
    if isinstance(peft_config, PromptTuningConfig):
        peft_config = to_peft_config(peft_config)
    if share_prompt_prefix is not _MISSING:
        check_request(share_prompt_prefix)
    with checkpointing_allowed(model, peft_config):  # prefix tuning runs under gradient checkpointing
        peft_model = peft.get_peft_model(model, peft_config, *args, **kwargs)
    if isinstance(peft_model, peft.PeftModel):
        accelerate(peft_model, share_prompt_prefix=share_prompt_prefix)
    return peft_model
