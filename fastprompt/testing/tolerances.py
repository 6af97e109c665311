"""The float dtypes, and the per-dtype tolerances every check against a float64 reference uses.

DESIGN.md's table: fp32 exact or ~1e-6; fp16 1e-3; bf16 1.6e-2 (atol and rtol alike). A sum of
``terms`` rounded values (a gradient reduced over the batch) widens atol by ``sqrt(terms)``.
"""

from __future__ import annotations

import math

import torch

from ..ops.checks import FLOAT_DTYPES

__all__ = ["DTYPE_NAMES", "FLOAT_DTYPES", "TOLERANCES", "max_error", "tolerance"]

# Short names of the float dtypes, for labels and tables.
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

TOLERANCES = {
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def tolerance(*dtypes: torch.dtype) -> dict:
    """The loosest tolerance among ``dtypes``: ``{"atol": ..., "rtol": ...}``."""
    return max((TOLERANCES[d] for d in dtypes), key=lambda t: t["atol"])


def max_error(actual: torch.Tensor, expected: torch.Tensor, tol: dict, terms: int = 1) -> tuple[bool, float]:
    """(within ``tol``, max abs error) of ``actual`` against ``expected`` (any shapes that broadcast).

    The bound is ``torch.testing.assert_close``'s, ``atol * sqrt(terms) + rtol * |expected|``; a NaN in
    ``actual`` (an element that was not written) fails, with error NaN.
    """
    actual, expected = actual.double(), expected.double()
    if torch.isnan(actual).any():
        return False, math.nan
    error = (actual - expected).abs()
    bound = tol["atol"] * math.sqrt(max(1, terms)) + tol["rtol"] * expected.abs()
    return bool((error <= bound).all()), float(error.max()) if error.numel() else 0.0
