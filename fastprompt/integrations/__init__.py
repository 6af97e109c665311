"""Integrations. PEFT: ``accelerate``, ``get_peft_model``, ``patch_peft``, ``unpatch_peft``.

Nothing here imports PEFT until a function that needs it is called.
"""

from ..prompt_once.kv_store import PromptKVStore, prompt_kv_store
from ..prompted_embeds.adapter_files import AdapterFileError
from .adapter_batches import AdapterNamesCollator
from .input_checks import check_prompt_inputs
from .peft_inputs_embeds import CALLS
from .peft_methods import WrappedBeforeFastpromptWarning, is_patched
from .peft_patch import accelerate, get_peft_model, patch_peft, unpatch_peft
from .peft_version import UntestedPeftWarning

__all__ = [
    "CALLS",
    "AdapterFileError",
    "AdapterNamesCollator",
    "PromptKVStore",
    "UntestedPeftWarning",
    "WrappedBeforeFastpromptWarning",
    "accelerate",
    "check_prompt_inputs",
    "get_peft_model",
    "is_patched",
    "patch_peft",
    "prompt_kv_store",
    "unpatch_peft",
]
