"""Which word-embedding modules ``prompt_concat`` can replace, and with which arguments.

PEFT calls the model's word-embedding MODULE, so whatever its ``forward`` does is part of the result.
We fuse only modules whose forward we know exactly:

- ``torch.nn.Embedding`` and subclasses that keep its ``forward`` (``padding_idx`` passed on);
- the scaled word embeddings of transformers, recognized by the source of their ``forward`` (so new
  models with the same code are covered too):
  ``return super().forward(input_ids) * self.embed_scale`` with a Python number (BART, MBart, M2M100, ...)
  and ``return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)`` with a buffer
  (Gemma, Gemma2, Gemma3, ...).

Anything else gets ``None``, and the caller then calls the module and concatenates, as PEFT does:
other forwards, accelerate's replaced ``forward``, ``max_norm`` / ``scale_grad_by_freq`` / ``sparse``,
and hooks of any kind, on the module or global (forward, pre-forward, backward, backward-pre), except
transformers' "inputs require grad" forward hook, which the caller reproduces. A fused lookup never
runs the module, so its hooks would silently stop firing.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass

import torch
from torch.nn.modules import module as _module_globals

from ..ops.checks import FLOAT_DTYPES as FUSABLE_DTYPES

PLAIN = "plain"
FLOAT_SCALE = "float_scale"  # * self.embed_scale (a Python number)
BUFFER_SCALE = "buffer_scale"  # * self.embed_scale.to(self.weight.dtype) (a tensor buffer)

_TEMPLATES = {
    "return super().forward(input_ids) * self.embed_scale": FLOAT_SCALE,
    "return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)": BUFFER_SCALE,
}
_TEMPLATE_DUMPS = {ast.dump(ast.parse(src).body[0]): kind for src, kind in _TEMPLATES.items()}

# Forward hooks that only set ``output.requires_grad_(True)``: transformers' enable_input_require_grads
# and PEFT's fallback for models without it. Reproduced on the fused output instead.
_REQUIRE_GRAD_HOOK_NAMES = frozenset({"make_inputs_require_grads", "make_inputs_require_grad"})


@dataclass(frozen=True)
class LookupSpec:
    """How to reproduce ``module(input_ids)`` inside ``prompt_concat``.

    Attributes:
        weight: [V, D] the module's table (float32, float16 or bfloat16).
        embed_scale: multiplies the token rows (None: no scaling): a Python float, or a 0-dim tensor
            on the table's device (a buffer scale, already rounded to the table's dtype).
        padding_idx: the row that gets no gradient (``nn.Embedding.padding_idx``).
        require_grad_hook: the module has the "inputs require grad" hook: the fused output must
            require grad like the module's output would.
    """

    weight: torch.Tensor
    embed_scale: float | torch.Tensor | None
    padding_idx: int | None
    require_grad_hook: bool


def full_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The shape of ``weight`` once gathered: ``ds_shape`` for a DeepSpeed ZeRO-3 parameter (whose
    local data is a flat shard, empty while it is released), else ``weight.shape``."""
    ds_shape = getattr(weight, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(weight.shape)


def _defining_class(cls: type, name: str) -> type | None:
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass
    return None


_FORWARD_KINDS: dict = {}  # class -> forward_kind (a dict, not functools.cache: dynamo warns on that)


def forward_kind(cls: type) -> str | None:
    """PLAIN, FLOAT_SCALE or BUFFER_SCALE when ``cls.forward`` is one we can fuse, else None (cached per
    class)."""
    if cls not in _FORWARD_KINDS:
        _FORWARD_KINDS[cls] = _forward_kind(cls)
    return _FORWARD_KINDS[cls]


def _forward_kind(cls: type) -> str | None:
    if not issubclass(cls, torch.nn.Embedding):
        return None
    owner = _defining_class(cls, "forward")
    if owner is torch.nn.Embedding:
        return PLAIN
    # The override must call nn.Embedding.forward through super() and only scale the result.
    parent = owner.__mro__[1]
    if _defining_class(parent, "forward") is not torch.nn.Embedding:
        return None
    body = forward_statements(owner.__dict__["forward"], ["self", "input_ids"])
    if body is None or len(body) != 1:
        return None
    return _TEMPLATE_DUMPS.get(ast.dump(body[0]))


def forward_statements(function, arguments: list[str]) -> list | None:
    """The statements of ``function``'s body (its docstring left out), parsed from its source, when it is
    a plain undecorated ``def`` taking exactly ``arguments``; else None."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None
    func = tree.body[0]
    if not isinstance(func, ast.FunctionDef) or func.decorator_list:
        return None
    if [a.arg for a in func.args.args] != arguments or func.args.vararg or func.args.kwarg:
        return None
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # docstring
    return body


def _buffer_scale(module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
    """``module.embed_scale.to(weight.dtype)``: what the module multiplies by, left on the device
    (``prompt_concat`` reads a tensor scale there: no host sync, nothing to cache)."""
    buffer = getattr(module, "embed_scale", None)
    if not isinstance(buffer, torch.Tensor) or buffer.numel() != 1 or buffer.is_meta:
        return None
    if buffer.device != weight.device or not buffer.is_floating_point():
        return None
    return buffer.detach().to(weight.dtype)


_GLOBAL_HOOK_DICTS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_forward_hooks_always_called",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)
_MODULE_HOOK_DICTS = ("_forward_pre_hooks", "_backward_pre_hooks", "_backward_hooks")


def _has_hooks(hooks, ignore_hook) -> bool:
    return any(ignore_hook is None or not ignore_hook(hook) for hook in (hooks or {}).values())


def _hooks_allow_fusion(module: torch.nn.Module, ignore_hook=None) -> tuple[bool, bool]:
    """(fusable, has the require-grad hook) given the module's and the global hooks.

    Any hook would run if the module were called: only the require-grad forward hook, whose effect
    the caller reproduces on the fused output, allows fusion, and hooks for which ``ignore_hook(hook)``
    is true (the caller runs them itself by calling the module: DeepSpeed ZeRO-3's gathering hooks).
    """
    if any(getattr(_module_globals, name, None) for name in _GLOBAL_HOOK_DICTS):
        return False, False
    if any(_has_hooks(getattr(module, name, None), ignore_hook) for name in _MODULE_HOOK_DICTS):
        return False, False
    require_grad = False
    for hook_id, hook in module._forward_hooks.items():
        if ignore_hook is not None and ignore_hook(hook):
            continue
        if getattr(hook, "__name__", None) not in _REQUIRE_GRAD_HOOK_NAMES:
            return False, False
        if hook_id in getattr(module, "_forward_hooks_with_kwargs", {}):
            return False, False
        require_grad = True
    return True, require_grad


def plain_lookup_options(embedding: torch.nn.Embedding) -> bool:
    """Whether ``embedding``'s options leave its forward a plain row lookup (no ``max_norm`` renorm,
    no ``scale_grad_by_freq``, no sparse gradient), which ``prompt_concat`` can reproduce."""
    return embedding.max_norm is None and not embedding.scale_grad_by_freq and not embedding.sparse


def lookup_spec(
    module: torch.nn.Module | None, *, ignore_hook=None, partitioned: bool = False
) -> LookupSpec | None:
    """The fused equivalent of ``module(input_ids)``, or None where the module must be called.

    ``ignore_hook`` and ``partitioned`` are for a caller that gathers the table itself before the op
    (``fastprompt.prompted_embeds.deepspeed_zero3``): hooks with ``ignore_hook(hook)`` true are allowed, and a
    0-element ZeRO-3 shard is checked by its full shape (``weight.ds_shape``).
    """
    if module is None:
        return None
    kind = forward_kind(type(module))
    if kind is None or "forward" in module.__dict__:
        return None
    if not plain_lookup_options(module):
        return None
    fusable, require_grad = _hooks_allow_fusion(module, ignore_hook)
    if not fusable:
        return None
    weight = module.weight
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FUSABLE_DTYPES or weight.is_meta:
        return None
    if len(full_shape(weight) if partitioned else weight.shape) != 2:
        return None
    if weight.numel() == 0 and not (partitioned and full_shape(weight) != weight.shape):
        return None  # empty, or ZeRO-3 sharded without a caller that gathers it (the module does)
    scale = None
    if kind == FLOAT_SCALE:
        scale = module.embed_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            return None
        scale = float(scale)
    elif kind == BUFFER_SCALE:
        scale = _buffer_scale(module, weight)
        if scale is None:
            return None
    return LookupSpec(weight, scale, module.padding_idx, require_grad)
