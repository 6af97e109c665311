"""The functional layer: the ``prompt_concat`` custom op, its autograd, backend choice and checks."""

from .backend import backend_for
from .prompt_concat import prompt_concat

__all__ = ["backend_for", "prompt_concat"]
