"""The prompt run once at the decoder: for any head that reads the decoder's hidden states.

A causal LM's ``forward`` is not always the stock one: TRL's trainers call ``model(..., labels=...,
fused_lm_head=True)``, whose forward (``trl.trainer.utils.add_fused_lm_head``) calls the decoder itself
(``model.base_model``, with ``use_cache=False``), slices its hidden states and projects them in tiles; a
user's own head or Liger's fused linear cross-entropy read the hidden states too. The CausalLM-level
shared forward (:mod:`fastprompt.prompt_once.shared_forward`) cannot reach inside those. Here the PEFT
call is made as PEFT makes it (``inputs_embeds`` = PEFT's ``[B, N + L, D]`` rows, the mask prefixed,
labels prefixed with -100), and the decoder, when it is called with exactly those ``inputs_embeds``,
runs a plan instead of its plain forward:

- :func:`shared_plan`: the prompt once per adapter (batch K), then the B rows' tokens on its keys/values
  (:func:`fastprompt.prompt_once.shared_forward.prompt_then_tokens`); the hidden states come back as
  ``[B, N + L, D]`` with the prompt rows expanded, so whatever the head does next is what it does on
  PEFT's path, with every row's gradient flowing back through the one prompt pass.
- packed rows in the inserted layout (:func:`fastprompt.prompt_once.packed_forward.inserted_plan`), read
  back into PEFT's layout.

The plan is installed on the decoder instance for the duration of the PEFT call only and acts on that one
tensor; any other call of the decoder runs as it would. Where the decoder's call carries what a plan
cannot keep exact (per-layer outputs, a cache, positions, other keywords) the plain forward runs: PEFT's
result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch

from .policy import CACHE_KEYWORDS, CALLS, RuntimeDecline, decoder_of
from .shared_forward import prompt_then_tokens, to_rows, uses_cache

# Keywords of the decoder's call that the shared plan handles (output_* only when unset or False).
# Those of _UNSET_ONLY may come only unset (None / False): anything else declines the plan.
_PLAN_KEYWORDS = frozenset(
    {
        "inputs_embeds",
        "attention_mask",
        "use_cache",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
    }
)
_UNSET_ONLY = ("output_attentions", "output_hidden_states", "position_ids", *CACHE_KEYWORDS)


@dataclasses.dataclass
class PlanState:
    """What happened to the plan during the call: ``ran`` (it ran), ``declined`` (the reason the plain
    forward ran instead), both empty if the decoder was never called with the marked rows; ``fallback``
    (the reason a plan ran its exact fallback instead of its own layout)."""

    ran: int = 0
    declined: str | None = None
    fallback: str | None = None


@contextlib.contextmanager
def decoder_plan(base_model, marker: torch.Tensor, plan):
    """While the block runs, ``base_model``'s decoder called with ``inputs_embeds`` that IS ``marker``
    (keywords only) returns ``plan(forward, kwargs, state)``, where ``forward`` is the decoder's own
    forward (hooks already run) and ``state`` the :class:`PlanState` yielded to the caller."""
    decoder = decoder_of(base_model)
    state = PlanState()
    if decoder is None:
        yield state
        return
    saved = decoder.__dict__.get("forward", _MISSING)
    forward = decoder.forward
    signature = inspect.signature(forward)

    def planned_forward(*args, **kwargs):
        named = kwargs
        if args:  # GPT-2's head passes input_ids by position
            try:
                named = dict(signature.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                return forward(*args, **kwargs)
            named.update(named.pop(_var_keyword(signature), None) or {})
        if named.get("inputs_embeds") is not marker:
            return forward(*args, **kwargs)
        return plan(forward, named, state)

    object.__setattr__(decoder, "forward", planned_forward)
    try:
        yield state
    finally:
        if saved is _MISSING:
            decoder.__dict__.pop("forward", None)
        else:
            object.__setattr__(decoder, "forward", saved)


_MISSING = object()


def _var_keyword(signature: inspect.Signature) -> str | None:
    """The name of a signature's ``**kwargs`` parameter, if any."""
    kinds = (p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD)
    return next(kinds, None)


def why_not_plan(kwargs: dict, batch: int, total: int) -> str | None:
    """Why the decoder's call cannot take the shared plan (its plain forward runs), or None.

    Args:
        kwargs: the decoder call's keywords.
        batch, total: B and N + L of the marked rows.
    """
    for key in _UNSET_ONLY:
        if kwargs.get(key):
            return f"the decoder was called with {key}"
    others = sorted(
        k for k, v in kwargs.items() if v is not None and k not in _PLAN_KEYWORDS | {*_UNSET_ONLY}
    )
    if others:
        return f"the decoder was called with keyword {others[0]!r}"
    mask = kwargs.get("attention_mask")
    if mask is not None and (not torch.is_tensor(mask) or tuple(mask.shape) != (batch, total)):
        return "the decoder was called with an attention mask that is not [B, N + L]"
    return None


def shared_plan(base_model, prompt_embeds: torch.Tensor, index, n: int, requested):
    """The plan that runs the prompt once per adapter at the decoder.

    Args:
        base_model: the causal LM (its layers' checkpointing is read).
        prompt_embeds: ``[K, N, D]`` prompt rows in the model's dtype (with grad).
        index: ``[B]`` int64, each row's prompt; None: K = 1.
        n: N.
        requested: the call's ``share_prompt_prefix`` (True: a decline raises ``ValueError``).
    """

    def plan(forward, kwargs: dict, state: PlanState):
        marked = kwargs["inputs_embeds"]  # [B, N + L, D]: PEFT's rows
        batch = marked.shape[0]
        reason = why_not_plan(kwargs, batch, marked.shape[1])
        if reason is not None:
            if requested:
                raise ValueError(f"share_prompt_prefix=True cannot apply: {reason}.")
            state.declined = reason
            return forward(**kwargs)
        call = {k: v for k, v in kwargs.items() if k in _PLAN_KEYWORDS and k != "inputs_embeds"}
        use_cache = call.pop("use_cache", None)
        return_dict = call.pop("return_dict", None)
        call.pop("output_attentions", None), call.pop("output_hidden_states", None)
        try:
            prompt, output, mode = prompt_then_tokens(
                base_model, forward, prompt_embeds, marked[:, n:], index, call
            )
        except RuntimeDecline as decline:  # the decoder did not read the prompt's cache: its plain forward
            if requested:
                raise ValueError(f"share_prompt_prefix=True cannot apply: {decline}.") from None
            state.declined = str(decline)
            return forward(**kwargs)
        fields = dict(output.items())
        prompt_hidden = prompt.output.last_hidden_state  # [K, N, D]
        fields["last_hidden_state"] = torch.cat(
            (to_rows(prompt_hidden, index, batch), output.last_hidden_state), dim=1
        )  # [B, N + L, D]
        if not uses_cache(base_model, use_cache, mode):
            for key in CACHE_KEYWORDS:
                fields.pop(key, None)
        state.ran += 1
        CALLS["shared"] += 1
        output = type(output)(**fields)
        return output if return_dict is not False else output.to_tuple()

    return plan


def run_shared(peft_model, base_call, inputs_embeds: torch.Tensor, prompt_embeds, index, n: int, requested):
    """Make the PEFT call ``base_call(inputs_embeds)`` with the prompt run once at the decoder.

    Args:
        base_call: makes PEFT's base-model call with the given ``[B, N + L, D]`` rows and returns its
            output (the head's: TRL's ``FusedCausalLMOutput``, logits, ...).
        inputs_embeds: PEFT's ``[B, N + L, D]`` rows (the marker the decoder is recognized by).
        prompt_embeds, index, n, requested: as for :func:`shared_plan`.

    A plan that was declined, or a decoder never called with the rows, leaves PEFT's result (counted as
    "not shared"; ``requested=True`` raises ``ValueError`` saying why).
    """
    base_model = peft_model.get_base_model()
    plan = shared_plan(base_model, prompt_embeds, index, n, requested)
    with decoder_plan(base_model, inputs_embeds, plan) as state:
        output = base_call(inputs_embeds)
    if not state.ran:
        reason = state.declined or "the model's forward never called its decoder with the prompted rows"
        if requested:
            raise ValueError(f"share_prompt_prefix=True cannot apply: {reason}.")
        CALLS["not shared"] += 1
    return output
