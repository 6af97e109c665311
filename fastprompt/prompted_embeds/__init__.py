"""The module layer: a model's prompted ``inputs_embeds`` (prompt rows, then token rows), and what makes them.

``prompted_inputs_embeds`` is its entry point; ``PromptTuningConfig``, ``PromptTuningInit`` and
``PromptEmbedding`` are PEFT's drop-ins.
"""

from .config import PromptTuningConfig, PromptTuningInit
from .embedding import PromptEmbedding
from .inputs_embeds import CALLS, prompted_inputs_embeds
from .prompt_rows import PromptSource

__all__ = [
    "CALLS",
    "PromptEmbedding",
    "PromptSource",
    "PromptTuningConfig",
    "PromptTuningInit",
    "prompted_inputs_embeds",
]
