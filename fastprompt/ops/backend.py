"""Which implementation of the fused op runs for a device.

    backend_for(device) -> "triton" | "interpret" | "torch"

- CUDA tensors with Triton importable -> "triton" (the compiled kernel).
- ``TRITON_INTERPRET=1`` with Triton importable -> "interpret": the same Triton kernel, run by
  Triton's interpreter on CPU tensors (slow; used by the tests).
- otherwise "torch": the pure-PyTorch path.

``FASTPROMPT_BACKEND=torch`` forces the PyTorch path everywhere; ``FASTPROMPT_BACKEND=triton`` forces
the Triton kernel (on a CPU tensor that needs ``TRITON_INTERPRET=1``, else a RuntimeError says so).
The environment is read at every call, so tests and users can switch it at run time.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("triton", "interpret", "torch")


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


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` (Triton then runs kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


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
    device = torch.device(device)
    forced = os.environ.get("FASTPROMPT_BACKEND", "").strip().lower()
    if forced not in ("", "auto", "torch", "triton"):
        raise ValueError(
            f"FASTPROMPT_BACKEND={forced!r} is not understood: expected 'torch', 'triton' or unset"
        )
    if forced == "torch":
        return "torch"
    can_compile = device.type == "cuda" and triton_available()
    can_interpret = device.type == "cpu" and triton_available() and interpreter_enabled()
    if forced == "triton" and not (can_compile or can_interpret):
        raise RuntimeError(
            f"FASTPROMPT_BACKEND=triton, but the Triton kernel cannot run on device {device}: it needs a "
            "CUDA device with triton installed, or CPU tensors with TRITON_INTERPRET=1 set before "
            "fastprompt is imported"
        )
    if can_compile:
        return "triton"
    if can_interpret:
        return "interpret"
    return "torch"
