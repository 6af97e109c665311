"""``accelerate``, ``get_peft_model``, ``patch_peft`` / ``unpatch_peft``: putting fastprompt's method
wrappers (``peft_methods``, ``peft_loading``) on PEFT models.

``accelerate(model)`` moves one model to a subclass of its class that carries the wrappers
(``isinstance(model, PeftModel)`` stays true; save / load / deepcopy / pickle work). ``patch_peft()`` puts
them on PEFT's classes themselves, so every model built or loaded afterwards is covered whatever the
import order; ``unpatch_peft()`` puts PEFT's original class attributes back, exactly.
"""

from __future__ import annotations

import gc
import threading

from .peft_loading import wrap_from_pretrained, wrap_load_adapter
from .peft_methods import FORWARDS, PROMPT_TUNING, FastPromptModel, original_of, set_patched, task_methods

__all__ = ["accelerate", "get_peft_model", "patch_peft", "unpatch_peft"]

_lock = threading.RLock()
_patched: dict = {}  # (class, attribute name) -> the class __dict__ entry before patching (or _MISSING)
_MISSING = object()
_fast_classes: dict = {}


def _peft_classes() -> dict:
    import peft.peft_model as peft_model_module

    names = ["PeftModel", *FORWARDS]
    return {name: getattr(peft_model_module, name) for name in names}


_INSTANCE_METHODS = ("forward", "prepare_inputs_for_generation")


def _drop_stale_bound_methods(peft_model, stale: dict) -> None:
    """Drop bound methods that PEFT's ``disable_adapter()`` left in the instance dict.

    ``disable_adapter()`` stores ``self.forward`` (and ``prepare_inputs_for_generation``) back on the
    instance as bound methods of the class as it was then; once the class's methods change they hide
    the new ones. ``stale`` maps an attribute name to the functions that count as stale.
    """
    if getattr(peft_model, "_adapters_disabled", False):
        return  # inside disable_adapter(): its own attributes are live
    for attribute in _INSTANCE_METHODS:
        bound = peft_model.__dict__.get(attribute)
        if getattr(bound, "__self__", None) is peft_model and getattr(bound, "__func__", None) in stale.get(
            attribute, ()
        ):
            del peft_model.__dict__[attribute]


def _refresh_existing_models(stale: dict) -> None:
    """Apply :func:`_drop_stale_bound_methods` to every live PEFT model (found through ``gc``)."""
    from peft import PeftModel

    for obj in gc.get_objects():
        if isinstance(obj, PeftModel):
            _drop_stale_bound_methods(obj, stale)


def _stale_map(pairs) -> dict:
    stale: dict = {}
    for attribute, function in pairs:
        if attribute in _INSTANCE_METHODS and function is not _MISSING:
            stale.setdefault(attribute, set()).add(function)
    return stale


# ------------------------------------------------------------------------------------ public API


def patch_peft() -> None:
    """Route every PEFT prompt-tuning model through ``prompt_concat`` (idempotent).

    Patches PEFT's classes (not module attributes), so models built or loaded afterwards by any route
    (``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModel...``, imported before or after)
    use the fused op, and so do existing models of those classes. Other adapter types are untouched.
    """
    with _lock:
        if _patched:
            return
        classes = _peft_classes()
        for name, cls in classes.items():
            methods = task_methods(name, cls) if name != "PeftModel" else {}
            if name == "PeftModel":
                methods["load_adapter"] = wrap_load_adapter(cls.__dict__["load_adapter"])
                methods["from_pretrained"] = wrap_from_pretrained(cls.__dict__["from_pretrained"])
            for attribute, wrapper in methods.items():
                _patched[(cls, attribute)] = cls.__dict__.get(attribute, _MISSING)
                setattr(cls, attribute, wrapper)
        set_patched(True)
        # Existing models that went through disable_adapter() hold PEFT's methods on the instance.
        _refresh_existing_models(_stale_map((attr, original) for (_, attr), original in _patched.items()))


def unpatch_peft() -> None:
    """Put PEFT's original class attributes back, exactly (idempotent)."""
    with _lock:
        wrappers = _stale_map(
            (attribute, cls.__dict__.get(attribute, _MISSING)) for cls, attribute in _patched
        )
        for (cls, attribute), original in _patched.items():
            if original is _MISSING:
                if attribute in cls.__dict__:
                    delattr(cls, attribute)
            else:
                setattr(cls, attribute, original)
        _patched.clear()
        set_patched(False)
        _refresh_existing_models(wrappers)


def _fast_class(cls: type) -> type:
    """The subclass of PEFT model class ``cls`` that carries the fastprompt wrappers (cached)."""
    with _lock:
        fast = _fast_classes.get(cls)
        if fast is not None:
            return fast
        classes = _peft_classes()
        namespace = {"__module__": __name__, "_fastprompt_base": cls}
        for name, peft_cls in classes.items():
            if name == "PeftModel" or not issubclass(cls, peft_cls):
                continue
            for attribute in task_methods(name, peft_cls):
                impl_owner = original_of(getattr(cls, attribute))
                wrapper = task_methods(name, peft_cls)[attribute]
                if impl_owner is not original_of(getattr(peft_cls, attribute)):
                    continue  # the user's subclass overrides it: leave theirs
                namespace[attribute] = wrapper
        namespace["load_adapter"] = wrap_load_adapter(cls.load_adapter)
        qualname = f"Fast{cls.__name__}"
        fast = type(qualname, (FastPromptModel, cls), namespace)
        if cls.__module__ == "peft.peft_model":
            globals()[qualname] = fast  # importable by name: pickle works
        _fast_classes[cls] = fast
        return fast


def _has_prompt_tuning_adapter(peft_model) -> bool:
    try:
        configs = peft_model.peft_config.values()
    except AttributeError:
        return False
    return any(getattr(config, "peft_type", None) == PROMPT_TUNING for config in configs)


def accelerate(peft_model):
    """Make ``peft_model`` (a PEFT prompt-tuning model) build its inputs with ``prompt_concat``.

    In place and idempotent; returns the same object. Models that are not prompt tuning, and plain
    ``PeftModel`` instances (no task type: PEFT adds no prompts there), are returned unchanged.

    Raises:
        TypeError: ``peft_model`` is not a ``peft.PeftModel``.
    """
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"accelerate() expects a peft.PeftModel, got {type(peft_model).__name__}.")
    if isinstance(peft_model, FastPromptModel) or not _has_prompt_tuning_adapter(peft_model):
        return peft_model
    cls = type(peft_model)
    classes = _peft_classes()
    if not any(issubclass(cls, classes[name]) for name in FORWARDS):
        return peft_model
    _drop_stale_bound_methods(
        peft_model, _stale_map((a, getattr(cls, a, _MISSING)) for a in _INSTANCE_METHODS)
    )
    peft_model.__class__ = _fast_class(cls)
    return peft_model


def get_peft_model(model, peft_config, *args, **kwargs):
    """``peft.get_peft_model`` then :func:`accelerate`. ``peft_config`` may be fastprompt's or PEFT's.

    Raises:
        ValueError: a prompt-tuning config without a valid ``task_type`` or ``prompt_tuning_init``.
    """
    import peft

    from ..config import PromptTuningConfig, check_for_model, to_peft_config

    check_for_model(peft_config)  # a ValueError naming the choices, not PEFT's KeyError: None
    if isinstance(peft_config, PromptTuningConfig):
        peft_config = to_peft_config(peft_config)
    peft_model = peft.get_peft_model(model, peft_config, *args, **kwargs)
    if isinstance(peft_model, peft.PeftModel):
        accelerate(peft_model)
    return peft_model
