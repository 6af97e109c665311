"""fastprompt: fast prompt tuning, a drop-in for PEFT's prompt tuning through one fused op."""

from .integrations import (
    AdapterFileError,
    AdapterNamesCollator,
    accelerate,
    get_peft_model,
    patch_peft,
    unpatch_peft,
)
from .ops import backend_for, prompt_concat
from .prompted_embeds import PromptEmbedding, PromptTuningConfig, PromptTuningInit

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "AdapterFileError",
    "AdapterNamesCollator",
    "PromptEmbedding",
    "PromptTuningConfig",
    "PromptTuningInit",
    "accelerate",
    "backend_for",
    "get_peft_model",
    "patch_peft",
    "prompt_concat",
    "unpatch_peft",
]
