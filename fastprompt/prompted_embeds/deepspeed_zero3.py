"""The fused prompt concat under DeepSpeed ZeRO-3, where the tables are partitioned across ranks.

Under ZeRO-3 every parameter is a flat shard (empty while released) and the engine puts hooks on every
module that gather the module's parameters before its ``forward`` and before its backward, and release
them after. The fused op calls neither the word-embedding module nor the prompt module, so those hooks
would not run. Here they are made to run around the op: the op runs as the ``forward`` of the prompt
tables' own ``nn.Embedding`` modules (nested, one per table), so ZeRO-3 gathers each table for the
forward and again for the backward (its gradient then reaches the partitioned table as usual), and the
word table, while it is frozen, is registered as an external parameter of the innermost of them for the
duration of the call only: gathered for the forward, not again for the backward (a trainable word table
is gathered by its own module's hooks, for both). Nothing is registered on the model beforehand, so this
works for models prepared by ``fastprompt.get_peft_model`` / ``accelerate`` / ``patch_peft`` alike, and
nothing changes the model's state dict. Rows an encoder computed (P-tuning, multitask) were gathered by
the encoder's own module call; with no table to host the op, it runs as the word-embedding module's
``forward``, whose hooks gather the word table (for the backward too where it is trainable).

:func:`run_gathered` does that around the op it is given; the module layer's entry point
(:func:`fastprompt.prompted_embeds.prompted_inputs_embeds`) is its one caller. The rest are predicates.

A ``deepspeed.zero.GatheredParameters`` context around the op would not do: it cannot release a tied word
table (GPT-2's) that the output layer holds ("Cannot free a ZeRO-3 parameter while it is still active in
submodules"), and it gives no gradient path to a partitioned prompt table.

DeepSpeed is imported only when a ZeRO-3 parameter is seen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Where DeepSpeed's ZeRO-3 module hooks are defined (some are wrapped by its NVTX decorator).
_ZERO3_HOOK_MODULES = frozenset({"deepspeed.runtime.zero.parameter_offload", "deepspeed.utils.nvtx"})


def is_zero3_param(tensor) -> bool:
    """Whether ``tensor`` is a DeepSpeed ZeRO-3 parameter (partitioned or not at the moment)."""
    return isinstance(tensor, torch.nn.Parameter) and hasattr(tensor, "ds_id") and hasattr(tensor, "ds_shape")


def is_zero3_hook(hook) -> bool:
    """Whether ``hook`` is one of the gathering / releasing hooks ZeRO-3 puts on every module."""
    return getattr(hook, "__module__", None) in _ZERO3_HOOK_MODULES


def _managed(module: torch.nn.Module) -> bool:
    """Whether a ZeRO-3 engine has put its hooks on ``module`` (``deepspeed.initialize`` has run)."""
    return hasattr(module, "ds_id") and any(is_zero3_hook(h) for h in module._forward_pre_hooks.values())


def is_zero3(word_embeddings: torch.nn.Module, prompt_modules) -> bool:
    """Whether the word table or a prompt table is a ZeRO-3 parameter."""
    tables = [getattr(getattr(m, "embedding", None), "weight", None) for m in prompt_modules]
    return any(is_zero3_param(t) for t in (getattr(word_embeddings, "weight", None), *tables))


def _call_as_forward(module: torch.nn.Module, input_ids: torch.Tensor, body):
    """``module(input_ids)`` with ``body()`` as its forward: ZeRO-3's hooks on ``module`` run around it."""
    module.forward = lambda *args, **kwargs: body()
    try:
        return module(input_ids)
    finally:
        del module.forward


def run_gathered(
    word_embeddings: torch.nn.Module,
    word: torch.Tensor,
    table_modules,
    input_ids: torch.Tensor,
    body: Callable[[], torch.Tensor],
) -> torch.Tensor | None:
    """``body()`` (the fused op) with the ZeRO-3 tables gathered around it by ZeRO-3's own module hooks;
    None where no engine's hooks can gather them (the caller then calls the modules, as PEFT does).

    Args:
        word_embeddings: the word-embedding module; ``word``: its table (``lookup_spec``'s weight).
        table_modules: the prompt modules whose tables the op reads as they are (their ``embedding``
            hosts the op); none where every prompt's rows were computed by calling its module.
        input_ids: what each host module is called with.
        body: makes the one fused ``prompt_concat`` call.
    """
    hosts = list(dict.fromkeys(m.embedding for m in table_modules))  # each table's nn.Embedding, once
    if not all(is_zero3_param(h.weight) for h in hosts) or not all(_managed(h) for h in hosts):
        return None  # ZeRO-3 modules outside an engine (no hooks to gather with): as the modules do
    if word.requires_grad or not hosts:
        if not (is_zero3_param(word) and _managed(word_embeddings)):
            return None
        hosts.insert(0, word_embeddings)  # its own hooks gather it for the forward (and the backward)
        external = False
    else:
        external = is_zero3_param(word) and id(word) not in getattr(hosts[-1], "_external_params", {})
    if external:
        from deepspeed.runtime.zero.partition_parameters import (
            register_external_parameter,
            unregister_external_parameter,
        )

        register_external_parameter(hosts[-1], word)

    def run(level: int) -> torch.Tensor:
        if level == len(hosts):
            return body()
        return _call_as_forward(hosts[level], input_ids, lambda: run(level + 1))

    try:
        return run(0)
    finally:
        if external:
            unregister_external_parameter(hosts[-1], word)
