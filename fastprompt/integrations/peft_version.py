"""Which PEFT versions the integration is known to be right for, and what happens with the others.

The integration re-states PEFT 0.21's prompt-tuning forwards and generation and calls PEFT's private
helpers (``_adjust_prompt_learning_kwargs``, ``_get_return_dict_transformers_v4``, ...). It is tested with
PEFT 0.21.x only (``TESTED``). With any other version, fastprompt warns once per process
(:class:`UntestedPeftWarning`) and leaves PEFT alone: ``accelerate`` returns models unchanged,
``patch_peft`` patches nothing, and models already moved to a fastprompt class (unpickled, say) run
PEFT's own code. Results are then PEFT's, without the fused op. Setting
``FASTPROMPT_ALLOW_UNTESTED_PEFT=1`` keeps the fused path with an untested version (it still warns once).
"""

from __future__ import annotations

import os
import warnings

__all__ = ["TESTED", "UntestedPeftWarning", "fused_path_allowed", "installed_peft_version"]

TESTED = (0, 21)  # (major, minor) of the PEFT releases the integration is tested with
TESTED_SPEC = "peft>=0.21,<0.22"
ALLOW_ENV = "FASTPROMPT_ALLOW_UNTESTED_PEFT"

_cache: dict = {"allowed": None}  # decided once per process (tests reset it)


class UntestedPeftWarning(UserWarning):
    """The installed PEFT is outside the range fastprompt's integration is tested with."""


def installed_peft_version() -> str:
    """The version string of the PEFT that ``import peft`` gives."""
    import peft

    return peft.__version__


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release
    except InvalidVersion:
        return ()


def fused_path_allowed() -> bool:
    """Whether the PEFT wrappers may take the fused path with the installed PEFT (decided once).

    True for PEFT 0.21.x. Otherwise warns once (:class:`UntestedPeftWarning`) and returns False, or
    True if ``FASTPROMPT_ALLOW_UNTESTED_PEFT=1``.
    """
    allowed = _cache["allowed"]
    if allowed is None:
        allowed = _cache["allowed"] = _decide()
    return allowed


def _decide() -> bool:
    version = installed_peft_version()
    if _release(version)[:2] == TESTED:
        return True
    forced = os.environ.get(ALLOW_ENV, "") == "1"
    tested = f"{TESTED[0]}.{TESTED[1]}.x"
    if forced:
        outcome = f"{ALLOW_ENV}=1 is set, so PEFT prompt-tuning models use the fused path anyway"
    else:
        outcome = (
            "so PEFT models are left to PEFT's own code (results are PEFT's, without the fused op). "
            f"Install '{TESTED_SPEC}' (pip install 'fastprompt[peft]') for the fused path, or set "
            f"{ALLOW_ENV}=1 to use it with this version"
        )
    warnings.warn(
        f"fastprompt's PEFT integration is tested with peft {tested} only; peft {version} is installed, "
        f"{outcome}.",
        UntestedPeftWarning,
        stacklevel=3,
    )
    return forced
