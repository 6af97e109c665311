"""The module layer: a model's prompted ``inputs_embeds`` (prompt rows, then token rows), and what makes them.

The layer between the op (``fastprompt.ops``) and everything that feeds a model soft prompts (the
prompt-once machinery, the PEFT integration, serving): it imports only the op. Its one entry point,
:func:`prompted_inputs_embeds`, takes every prompt source (a table, P-tuning's encoder, multitask's task
scaling, rows computed already) into one fused ``prompt_concat`` call, through one ZeRO-3 branch and one
unfused fallback. ``PromptTuningConfig``, ``PromptTuningInit`` and ``PromptEmbedding`` are PEFT's
drop-ins.

Its modules, in order: each imports only those before it (this ``__init__`` re-exports from them).

1. ``config``: ``PromptTuningConfig``, ``PromptTuningInit``, the PEFT type names, ``adapter_config.json``.
2. ``adapter_files``: reading and checking PEFT's soft-prompt adapter files without PEFT.
3. ``prefix_adapter_files``: the same checks for PEFT's prefix-tuning adapter files (per-layer keys/values).
4. ``word_embeddings``: which word-embedding modules the op can reproduce, and with which arguments.
5. ``deepspeed_zero3``: running the op inside the modules whose ZeRO-3 hooks gather the tables.
6. ``prompt_rows``: where a prompt's rows come from (``PromptSource``): a plain table read as it is, or
   the rows its module computes.
7. ``fused_concat``: the one ``prompt_concat`` call, and ``CALLS``.
8. ``inputs_embeds``: the entry point, ``prompted_inputs_embeds``.
9. ``embedding``: ``PromptEmbedding``, PEFT's prompt table, whose ``prepend`` calls the entry point.
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
