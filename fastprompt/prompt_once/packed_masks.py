"""The masks of packed rows, handed to the model where it makes its own.

A decoder of transformers builds its attention masks by calling ``transformers.masking_utils``' mask
functions from its modeling module: ``create_causal_mask`` for full-attention layers,
``create_sliding_window_causal_mask`` for sliding-window ones, ``create_chunked_causal_mask`` for Llama 4's
chunked ones, one call per kind of layer it has (a dict of masks keyed by layer type, or one mask). Which
kinds a model has, and how it routes them to its layers, is the model's own business: fastprompt does not
keep a list. While a packed call runs, :func:`hand_masks` replaces those functions in the modules of the
model's classes by ones that return the layout's mask of the same kind, built from the documents'
positions (:func:`packed.layout_mask`): each query sees its own document's earlier tokens and the prompt,
within the layer's window or chunk as counted in positions.

What the hook saw is kept (:class:`MaskHook`): a model that never called a mask function (it builds its
mask another way, or takes none) or called one of a kind not known here ran with a mask that is not the
layout's, and its output must not be used (the caller runs the exact unpacked layout instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading

import torch

from . import packed

# transformers.masking_utils function -> the kind of mask it makes, and the config field of its span.
KINDS = {
    "create_causal_mask": ("full", None),
    "create_sliding_window_causal_mask": ("sliding", "sliding_window"),
    "create_chunked_causal_mask": ("chunked", "attention_chunk_size"),
}
MASKING_MODULE = "transformers.masking_utils"
# One hooked call at a time: the hook rebinds module globals. Other threads calling the same models
# meanwhile get transformers' own masks (the replacements check the thread).
_LOCK = threading.RLock()


@dataclasses.dataclass
class MaskHook:
    """What the model asked for during a hooked call.

    Attributes:
        calls: how many mask functions it called (any kind).
        unknown: the names of mask functions it called that make a kind not known here.
    """

    calls: int = 0
    unknown: list = dataclasses.field(default_factory=list)

    @property
    def reason(self) -> str | None:
        """Why the hooked call's output is not the layout's, or None."""
        if self.unknown:
            return f"the model makes masks with {sorted(set(self.unknown))}, not known for packed rows"
        if not self.calls:
            return "the model builds its attention mask without transformers' mask functions"
        return None


def model_modules(*models) -> list:
    """The modules (Python ``sys.modules`` entries) of the classes of ``models`` and their bases that
    hold transformers' mask functions as globals."""
    found = []
    for model in models:
        if model is None:
            continue
        for cls in type(model).__mro__:
            module = sys.modules.get(cls.__module__)
            if module is not None and module not in found and mask_functions(module):
                found.append(module)
    return found


def mask_functions(module) -> dict:
    """``name -> function``: the globals of ``module`` that are transformers' ``create_*`` mask functions."""
    return {
        name: value
        for name, value in vars(module).items()
        if callable(value)
        and getattr(value, "__module__", None) == MASKING_MODULE
        and getattr(value, "__name__", "").startswith("create_")
        and "mask" in getattr(value, "__name__", "")
    }


def can_hand_masks(*models) -> bool:
    """Whether the models' classes build masks with transformers' mask functions (that the hook takes)."""
    return any(name in KINDS for module in model_modules(*models) for name in mask_functions(module))


@contextlib.contextmanager
def hand_masks(models, layout, implementation: str, dtype: torch.dtype):
    """While the block runs, the models' mask functions return ``layout``'s masks.

    Args:
        models: the base model and its decoder (their classes' modules are hooked).
        layout: the :class:`packed.Layout` of the call's ``[B, S]`` slots.
        implementation: the attention implementation (``packed.MASK_FORMS``: the mask's form).
        dtype: the activations' dtype (an additive mask's).

    Yields:
        :class:`MaskHook`.
    """
    hook = MaskHook()
    made: dict = {}
    owner = threading.get_ident()

    def replacement(name, original):
        kind, span_field = KINDS.get(name, (None, None))

        def create_mask(config, *args, **kwargs):
            if threading.get_ident() != owner:
                return original(config, *args, **kwargs)
            hook.calls += 1
            overlays = [k for k in ("or_mask_function", "and_mask_function") if kwargs.get(k) is not None]
            if kind is None or overlays:  # a kind, or an overlay (bidirectional blocks), not known here
                hook.unknown.append(name if not overlays else f"{name}({overlays[0]}=...)")
                return original(config, *args, **kwargs)
            span = getattr(config, span_field, None) if span_field else None
            key = (kind, span)
            if key not in made:
                made[key] = packed.layout_mask(layout, kind, span, implementation, dtype)
            return made[key]

        return create_mask

    with _LOCK:
        saved = []
        for module in model_modules(*models):
            for name, original in mask_functions(module).items():
                saved.append((module, name, original))
                setattr(module, name, replacement(name, original))
        try:
            yield hook
        finally:
            for module, name, original in saved:
                setattr(module, name, original)
