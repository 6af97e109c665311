"""Moved to :mod:`fastprompt.prompt_once.prompt_pass`.

This name is kept so that existing imports work: it is that module
itself (the same object, so its counters and settings are shared)."""

import sys

from ..prompt_once import prompt_pass

sys.modules[__name__] = prompt_pass
