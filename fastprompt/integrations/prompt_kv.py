"""Moved to :mod:`fastprompt.prompt_once.kv_store`.

This name is kept so that existing imports work: it is that module
itself (the same object, so its counters and settings are shared)."""

import sys

from ..prompt_once import kv_store

sys.modules[__name__] = kv_store
