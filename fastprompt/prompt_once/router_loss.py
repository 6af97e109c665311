"""The router's auxiliary loss of a mixture-of-experts model, when the prompt runs once.

With ``output_router_logits`` on, a MoE causal LM's forward hands the router logits of every position it
ran (per MoE layer, ``[rows * positions, E]``) and the call's mask to its family's own load-balancing loss
(``load_balancing_loss_func`` in transformers' modeling modules: Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss,
Granite-MoE, ...), and adds ``router_aux_loss_coef`` times it to the loss. On PEFT's path those positions
are every row's N virtual tokens and its L tokens, so the prompt's router logits count once per row.

A shared forward runs the prompt once (batch K) and the tokens on top. :func:`prompt_router_logits` gives
the family's own loss function, wherever the model's forward calls it, the router logits PEFT's path would
produce: per layer, each row's prompt logits (of its adapter) then its token logits, ``[B * (N + L), E]``.
Nothing here knows a family: the functions are found in the modeling module of the model's class, as the
globals its ``forward`` calls whose first parameter takes router logits (:func:`aux_loss_functions`).
Where the forward calls none, sharing declines with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
import threading

import torch

# One hooked call at a time: the hook rebinds module globals. Other threads calling the same models
# meanwhile get the family's own function (the replacement checks the thread).
_LOCK = threading.RLock()
ROUTER_LOGITS = "output_router_logits"


def asked(base_model, kwargs: dict) -> bool:
    """Whether the call asks for router logits (its ``output_router_logits``, else the config's)."""
    value = kwargs.get(ROUTER_LOGITS)
    if value is None:
        config = base_model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        value = getattr(config, ROUTER_LOGITS, False)
    return bool(value)


def aux_loss_functions(base_model) -> list[tuple[object, str]]:
    """``(module, name)`` of each function the model's ``forward`` calls from its class's module whose first
    parameter takes router logits (``gate_logits``, ``router_logits``): the family's auxiliary loss."""
    for cls in type(base_model).__mro__:
        forward = cls.__dict__.get("forward")
        if forward is None:
            continue
        module = sys.modules.get(cls.__module__)
        code = getattr(inspect.unwrap(forward), "__code__", None)
        if module is None or code is None:
            return []
        return [
            (module, name)
            for name in code.co_names
            if inspect.isfunction(vars(module).get(name)) and _takes_router_logits(vars(module)[name])
        ]
    return []


def _takes_router_logits(function) -> bool:
    try:
        parameters = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    return bool(parameters) and "logits" in parameters[0]


def decline_reason(base_model) -> str | None:
    """Why the router's auxiliary loss of a shared forward cannot be made PEFT's, or None. A forward that
    calls no such function (GLM-4-MoE, DeepSeek-V3: router logits, no auxiliary loss) shares: the router
    logits it returns are joined after the token pass, and a model found to compute an auxiliary loss
    some other way declines then (``shared_forward``)."""
    return None


@dataclasses.dataclass
class RouterHook:
    """What the hooked call's auxiliary loss got.

    Attributes:
        logits: the per-layer router logits PEFT's path would have had (``[B * (N + L), E]``), as given to
            the family's function (None until it is called).
        error: why the token pass's router logits could not be joined with the prompt's, or None.
    """

    logits: tuple | None = None
    error: str | None = None


def join(prompt_layers, token_layers, index: torch.Tensor | None, batch: int, n: int):
    """Per layer, each row's prompt router logits then its token logits, in the token logits' layout.

    Args:
        prompt_layers: per MoE layer, ``[K * N, E]`` (or ``[K, N, E]``) from the prompt pass.
        token_layers: per MoE layer, ``[B * L, E]`` (or ``[B, L, E]``) from the token pass.
        index: ``[B]`` int64, the prompt of each row; None: K = 1.

    Returns:
        A tuple per layer, ``[B * (N + L), E]`` (or ``[B, N + L, E]``), or None where the layers do not
        match.
    """
    if prompt_layers is None or len(prompt_layers) != len(token_layers):
        return None
    joined = []
    for prompt, tokens in zip(prompt_layers, token_layers, strict=True):
        if not (torch.is_tensor(prompt) and torch.is_tensor(tokens)):
            return None
        experts = tokens.shape[-1]
        per_prompt = prompt.reshape(-1, n, experts)
        rows = per_prompt.expand(batch, -1, -1) if index is None else per_prompt.index_select(0, index)
        full = torch.cat((rows.to(tokens.dtype), tokens.reshape(batch, -1, experts)), dim=1)
        joined.append(full.reshape(-1, experts) if tokens.dim() == 2 else full)
    return tuple(joined)


@contextlib.contextmanager
def prompt_router_logits(base_model, prompt_layers, index: torch.Tensor | None, batch: int, n: int):
    """While the block (the token pass) runs, the family's auxiliary-loss functions get PEFT's router
    logits: the prompt's (``prompt_layers``, per MoE layer ``[K * N, E]``) joined with the tokens'.

    Yields:
        :class:`RouterHook`.
    """
    hook = RouterHook()
    owner = threading.get_ident()

    def replacement(original):
        def aux_loss(gate_logits, *args, **kwargs):
            if threading.get_ident() != owner:
                return original(gate_logits, *args, **kwargs)
            full = join(prompt_layers, gate_logits, index, batch, n) if gate_logits is not None else None
            if full is None:
                hook.error = "the token pass's router logits do not match the prompt pass's layer for layer"
                return original(gate_logits, *args, **kwargs)
            hook.logits = full
            return original(full, *args, **kwargs)

        return aux_loss

    with _LOCK:
        saved = [(module, name, getattr(module, name)) for module, name in aux_loss_functions(base_model)]
        for module, name, original in saved:
            setattr(module, name, replacement(original))
        try:
            yield hook
        finally:
            for module, name, original in saved:
                setattr(module, name, original)
