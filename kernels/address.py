"""Address math shared by the kernels: every element offset is computed in int64.

``B * (T+L) * D`` and ``V * D`` can exceed 2**31 (e.g. B=32, T+L=4196, D=16384), so a row index is
widened to int64 before it is multiplied by its stride. The kernels call these helpers for every
row offset; tests run them under the interpreter on values past 2**31.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_offset(row, stride):
    """Element offset of ``row`` (any int tensor or scalar) along a dim of ``stride`` elements, int64."""
    return row.to(tl.int64) * stride


def _interpreted(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(fn, InterpretedFunction)


# How Triton defined this package's kernels, decided once when it was imported (``TRITON_INTERPRET``
# is read by ``triton.jit`` at decoration time): True when they run in Triton's interpreter on CPU
# tensors, False when they compile for a GPU. ``fastprompt.ops.backend`` follows this fact.
INTERPRETED: bool = _interpreted(row_offset)

try:  # Triton imports gluon lazily at the first interpreted launch, and gluon asserts that
    # TRITON_INTERPRET still says what it said when the kernels were defined: import it now, while it does.
    import triton.experimental.gluon  # noqa: F401
except ImportError:  # older triton: no gluon
    pass
