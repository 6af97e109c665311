"""Engine settings that make soft prompts work on vLLM, shared by the offline ``LLM`` and the server."""

from __future__ import annotations

# The CPU attention backend takes block sizes that are multiples of 32 only, and its default (128) is
# longer than most soft prompts: a prompt shorter than one block would never be served from the prefix
# cache (only full blocks are cached). 32 is its smallest size; CUDA's default (16) already suits.
CPU_BLOCK_SIZE = 32


def engine_defaults(engine_kwargs: dict) -> dict:
    """``engine_kwargs`` with what serving soft prompts needs: ``enable_prompt_embeds=True`` (an error if
    the caller turned it off), prefix caching on unless the caller says otherwise, and on the CPU
    backend ``block_size=32`` unless the caller chose one. Every other argument is passed through."""
    kwargs = dict(engine_kwargs)
    if kwargs.get("enable_prompt_embeds") is False:
        raise ValueError(
            "enable_prompt_embeds=False: soft prompts reach vLLM as prompt embeddings; leave it out or True."
        )
    kwargs["enable_prompt_embeds"] = True
    kwargs.setdefault("enable_prefix_caching", True)
    if kwargs.get("block_size") is None:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            kwargs["block_size"] = CPU_BLOCK_SIZE
    return kwargs
