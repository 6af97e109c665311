"""How a token-row scale reaches a kernel: not at all, as a float argument, or as a tensor on device.

A one-element tensor (e.g. Gemma3's ``embed_scale`` buffer) is passed as a pointer and read by the
kernel, so no host sync is needed and CUDA graphs / ``torch.compile`` keep working.
"""

from __future__ import annotations

import torch

# Token-row scale modes (constexpr): none, a float argument, a one-element tensor read on device.
SCALE_NONE = 0
SCALE_FLOAT = 1
SCALE_TENSOR = 2


def scale_arguments(embed_scale, placeholder: torch.Tensor) -> tuple[int, float, torch.Tensor]:
    """(SCALE_MODE, float argument, tensor argument) for ``embed_scale`` = None, a float or a tensor."""
    if embed_scale is None:
        return SCALE_NONE, 1.0, placeholder
    if isinstance(embed_scale, torch.Tensor):
        return SCALE_TENSOR, 1.0, embed_scale
    return SCALE_FLOAT, float(embed_scale), placeholder
