"""Which implementation of the fused op runs for a device.

    backend_for(device) -> "triton" | "interpret" | "torch"

- CUDA tensors with Triton importable -> "triton" (the compiled kernel).
- Triton's interpreter on, with Triton importable -> "interpret": the same Triton kernel, run by
  Triton's interpreter on CPU tensors (slow; used by the tests).
- otherwise "torch": the pure-PyTorch path.

Whether the interpreter is on is decided ONCE: ``triton.jit`` reads ``TRITON_INTERPRET`` when it
defines the kernels, so that is the fact that counts. Once ``fastprompt.kernels`` is imported, its
``INTERPRETED`` is the answer; before that, ``TRITON_INTERPRET`` is read at the first question and
``load_kernels`` defines the kernels under that same value. Changing ``TRITON_INTERPRET`` later
changes neither.

``FASTPROMPT_BACKEND=torch`` forces the PyTorch path everywhere; ``FASTPROMPT_BACKEND=triton`` forces
the Triton kernel (on a CPU tensor that needs the interpreter, else a RuntimeError says so). This
variable is read at every call, so tests and users can switch it at run time; the answer for each
(device type, value) is cached.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys

import torch

_KERNELS = "fastprompt.kernels"
_FORCED = ("", "auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked once)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install must not break the torch path
        return False
    return True


def _env_says_interpret(value: str | None) -> bool:
    return (value or "0") not in ("0", "false", "False")


@functools.cache
def _interpret_at_first_use() -> bool:
    """``TRITON_INTERPRET`` as it was at the first question (read once)."""
    return _env_says_interpret(os.environ.get("TRITON_INTERPRET"))


def interpreter_enabled() -> bool:
    """True when the Triton kernels run (or, once loaded, will run) in Triton's interpreter."""
    kernels = sys.modules.get(_KERNELS)
    if kernels is not None and hasattr(kernels, "INTERPRETED"):
        return kernels.INTERPRETED  # how they were actually defined
    return triton_available() and _interpret_at_first_use()


def load_kernels():
    """Import ``fastprompt.kernels`` (lazily: the torch path works without triton), defining them
    under the interpreter decision ``interpreter_enabled`` already gave."""
    kernels = sys.modules.get(_KERNELS)
    if kernels is not None and hasattr(kernels, "INTERPRETED"):
        return kernels
    decided = interpreter_enabled()
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if decided else "0"
    try:
        kernels = importlib.import_module(_KERNELS)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    if kernels.INTERPRETED != decided:  # only if triton.knobs overrides the environment
        raise RuntimeError(
            f"fastprompt.kernels were defined with interpreter={kernels.INTERPRETED}, but fastprompt "
            f"had decided interpreter={decided}: set TRITON_INTERPRET before importing fastprompt"
        )
    return kernels


_CACHE: dict[tuple[str, str, bool], str] = {}  # (device type, FASTPROMPT_BACKEND, kernels imported)


def backend_for(device: torch.device | str) -> str:
    """Name the implementation ``prompt_concat`` uses for tensors on ``device``.

    Args:
        device: a ``torch.device`` or a string such as ``"cuda:0"`` or ``"cpu"``.

    Returns:
        ``"triton"``, ``"interpret"`` or ``"torch"``.

    Raises:
        ValueError: ``FASTPROMPT_BACKEND`` holds an unknown value.
        RuntimeError: ``FASTPROMPT_BACKEND=triton`` where the Triton kernel cannot run.
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    # The interpreter fact can change only once, when the kernels are imported: key on that.
    key = (device_type, os.environ.get("FASTPROMPT_BACKEND", ""), _KERNELS in sys.modules)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    name = _choose(device_type, key[1].strip().lower(), interpreter_enabled())
    _CACHE[key] = name
    return name


def _choose(device_type: str, forced: str, interpret: bool) -> str:
    if forced not in _FORCED:
        raise ValueError(
            f"FASTPROMPT_BACKEND={forced!r} is not understood: expected 'torch', 'triton' or unset"
        )
    if forced == "torch":
        return "torch"
    can_compile = device_type == "cuda" and triton_available() and not interpret
    can_interpret = device_type == "cpu" and interpret
    if forced == "triton" and not (can_compile or can_interpret):
        raise RuntimeError(
            f"FASTPROMPT_BACKEND=triton, but the Triton kernel cannot run on device {device_type}: it needs "
            "a CUDA device with triton installed, or CPU tensors with TRITON_INTERPRET=1 set before "
            "fastprompt is imported"
        )
    if can_compile:
        return "triton"
    if can_interpret:
        return "interpret"
    return "torch"
