"""The providers every benchmark compares, and their inputs.

All take ``(input_ids, word_weight, prompt_weight, prompt_tokens)``: ``peft`` (PEFT's eager code path,
op by op: ``fastprompt.testing.reference.peft_concat``), ``compile`` (``torch.compile`` of that same
function) and ``fastprompt`` (``fastprompt.prompt_concat``).

- ``make_inputs``: random inputs for a ``Shape`` (token ids, word table, prompt table, prompt tokens).
- ``op_call``: a no-argument call of a provider, forward or forward+backward.
- ``assert_matches_peft``: a provider's result against ``peft``'s, before it is timed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ops import prompt_concat
from ..testing.reference import peft_concat
from .shapes import Shape

PROVIDERS = ("peft", "compile", "fastprompt")


@dataclass
class OpInputs:
    """Inputs of one call; ``grad_out`` is set for forward+backward runs."""

    input_ids: torch.Tensor
    word_weight: torch.Tensor
    prompt_weight: torch.Tensor
    prompt_tokens: torch.Tensor
    grad_out: torch.Tensor | None = None

    @property
    def args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The positional arguments every provider takes."""
        return self.input_ids, self.word_weight, self.prompt_weight, self.prompt_tokens


def make_inputs(
    shape: Shape,
    device: torch.device | str,
    *,
    backward: bool = False,
    seed: int = 0,
    word_weight: torch.Tensor | None = None,
) -> OpInputs:
    """Random inputs for ``shape`` on ``device``, as prompt tuning has them.

    The word table is frozen (``word_weight``, e.g. a real model's, or a random one); with ``backward``
    the prompt table requires grad and a random upstream gradient ``grad_out`` [B, T+L, D] is drawn
    (never all-ones: a real loss gives varied gradients).
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: fast for big tables

    def randn(*size: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(size, generator=gen, device=device).to(dtype)

    if word_weight is None:
        word = randn(shape.vocab, shape.dim, dtype=shape.word_dtype)
    else:
        word = word_weight.detach().to(device)
    prompt = randn(shape.prompt, shape.dim, dtype=shape.prompt_dtype)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen, device=device)
    grad_out = None
    if backward:
        prompt.requires_grad_(True)
        grad_out = randn(shape.batch, shape.prompt + shape.seq, shape.dim, dtype=shape.word_dtype)
    return OpInputs(ids, word, prompt, torch.arange(shape.prompt, device=device), grad_out)


def fastprompt_concat(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    prompt_weight: torch.Tensor,
    prompt_tokens: torch.Tensor,
) -> torch.Tensor:
    """The fused op; ``prompt_tokens`` is all prompt rows in order, which is ``prompt_indices=None``."""
    del prompt_tokens
    return prompt_concat(input_ids, word_weight, prompt_weight)


_COMPILED: dict[str, Callable] = {}


def compiled_peft_concat() -> Callable:
    """``torch.compile(peft_concat, fullgraph=True, dynamic=False)``, one specialised graph per shape.

    The recompile limit is raised so that a grid of shapes never falls back to eager silently.
    """
    if "peft" not in _COMPILED:
        dynamo_config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
        _COMPILED["peft"] = torch.compile(peft_concat, fullgraph=True, dynamic=False)
    return _COMPILED["peft"]


def provider_fn(name: str) -> Callable:
    """The function behind a provider name (``peft``, ``compile`` or ``fastprompt``)."""
    if name == "peft":
        return peft_concat
    if name == "compile":
        return compiled_peft_concat()
    if name == "fastprompt":
        return fastprompt_concat
    raise ValueError(f"unknown provider {name!r}: expected one of {', '.join(PROVIDERS)}")


def op_call(name: str, inputs: OpInputs, *, backward: bool = False) -> Callable[[], object]:
    """A no-argument call of provider ``name``: the forward, or forward+backward into the prompt grad."""
    fn = provider_fn(name)
    if not backward:

        def forward():
            with torch.no_grad():
                return fn(*inputs.args)

        return forward
    if inputs.grad_out is None:
        raise ValueError("make_inputs(..., backward=True) gives the upstream gradient a backward run needs")

    def forward_backward():
        inputs.prompt_weight.grad = None
        out = fn(*inputs.args)
        out.backward(inputs.grad_out)
        return inputs.prompt_weight.grad

    return forward_backward


def assert_matches_peft(name: str, inputs: OpInputs, *, backward: bool = False) -> None:
    """Raise AssertionError unless provider ``name`` gives ``peft``'s result on ``inputs``.

    Forward: bit for bit (a gather and a cast round the same way). Forward+backward: the prompt
    gradient within ``torch.testing.assert_close``'s tolerance for its dtype (a sum over the batch,
    which may add in another order).
    """
    expected = op_call("peft", inputs, backward=backward)()
    expected = expected.detach().clone()
    actual = op_call(name, inputs, backward=backward)()
    tolerance = {} if backward else {"atol": 0.0, "rtol": 0.0}
    torch.testing.assert_close(actual, expected, **tolerance, msg=lambda m: f"{name} vs peft: {m}")
