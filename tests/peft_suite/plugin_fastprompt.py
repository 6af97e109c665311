"""pytest plugin for PEFT's own tests: every PEFT prompt-tuning model runs through fastprompt.

``-p plugin_fastprompt``: ``fastprompt.patch_peft()`` before any test (default ``share_prompt_prefix=None``).
``FASTPROMPT_FORCE_SHARE=1`` also lifts the cost rule of the shared prompt prefix, so every call where
sharing is exact shares (PEFT's test batches are too small to pay otherwise). At the end, the counters of
the fused concat and of the shared prefix go to ``FASTPROMPT_CALLS_FILE`` (and stdout).
"""

from __future__ import annotations

import os

import fastprompt


def pytest_configure(config):
    fastprompt.patch_peft()
    if os.environ.get("FASTPROMPT_FORCE_SHARE") == "1":
        from fastprompt.prompt_once import policy as shared_prefix

        shared_prefix.MIN_SAVED_POSITIONS = 0
        shared_prefix.MAX_POSITION_FRACTION = 1.0


def pytest_unconfigure(config):
    from fastprompt import prompted_embeds
    from fastprompt.prompt_once import policy as shared_prefix

    line = (
        f"shared_prefix.CALLS={dict(shared_prefix.CALLS)} prompted_embeds.CALLS={dict(prompted_embeds.CALLS)}"
    )
    print(f"\n[plugin_fastprompt] {line}")
    with open(os.environ.get("FASTPROMPT_CALLS_FILE", "fastprompt_calls.txt"), "w") as f:
        f.write(line + "\n")
