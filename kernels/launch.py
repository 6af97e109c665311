"""A kernel launch as data: which kernel, its grid, its arguments and its compile-time parameters.

The launchers build a ``Launch`` and call it. ``bench/kernel_report.py`` builds the very same objects
(from the launchers' own planning functions, on meta tensors) and compiles them for a GPU target
instead of launching them, so every block choice a launcher makes is what the report compiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Launch:
    """``kernel[grid](*args, **meta)``; ``meta`` holds the constexprs and ``num_warps``."""

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The kernel's function name, e.g. ``_prompt_concat_fwd_kernel``."""
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", repr(fn))

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)
