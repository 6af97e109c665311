"""fastprompt: fast prompt tuning, a drop-in for PEFT's prompt tuning through one fused op."""

from .ops import backend_for, prompt_concat

__version__ = "0.1.0"

__all__ = ["__version__", "backend_for", "prompt_concat"]
