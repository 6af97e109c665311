"""Integrations. PEFT: ``accelerate``, ``get_peft_model``, ``patch_peft``, ``unpatch_peft``.

Nothing here imports PEFT until a function that needs it is called.
"""

from .adapter_batches import AdapterNamesCollator
from .adapter_files import AdapterFileError
from .peft_methods import is_patched
from .peft_patch import accelerate, get_peft_model, patch_peft, unpatch_peft
from .prompt_kv import PromptKVStore, prompt_kv_store
from .prompted_embeds import CALLS

__all__ = [
    "CALLS",
    "AdapterFileError",
    "AdapterNamesCollator",
    "PromptKVStore",
    "accelerate",
    "get_peft_model",
    "is_patched",
    "patch_peft",
    "prompt_kv_store",
    "unpatch_peft",
]
