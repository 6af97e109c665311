"""Model-level workloads of a prompt-tuned causal LM (timed by ``pytest bench`` and the CLI).

- ``TrainStep``: one prompt-tuning step (forward with labels, backward, AdamW step on the prompt).
- ``MixedPrecisionStep``: the same step the way ``Trainer(bf16=True)`` / ``fp16=True`` runs it: through
  an autocast wrapper set on ``model.forward`` (``autocast_forward``, as accelerate's ``prepare_model``
  sets it), fp16 with a ``GradScaler``; ``autocast_check``: autocast reaches the base model, same logits.
- ``greedy_generate`` (from ``fastprompt.testing.tiny_models``): greedy decoding of a few new tokens.
- ``peft_generation_uses_cache``: whether PEFT's own cached generation can be timed here, or only its
  uncached one gives the right tokens.
- ``max_positions`` / ``fit_lengths``: the lengths a model can take, for models with few positions.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

from ..testing.tiny_models import greedy_generate, token_batch

__all__ = [
    "MixedPrecisionStep",
    "TrainStep",
    "autocast_check",
    "autocast_forward",
    "fit_lengths",
    "greedy_generate",
    "max_positions",
    "peft_generation_uses_cache",
]


class TrainStep:
    """One training step of ``model`` on a fixed random batch; call it to run a step, get the loss."""

    def __init__(self, model, batch: int, seq: int, *, lr: float = 1e-3, seed: int = 0, extra=None):
        self.model = model
        self.input_ids = token_batch(model, batch, seq, seed=seed)
        self.attention_mask = torch.ones_like(self.input_ids)
        self.extra = dict(extra or {})  # more keywords of every call (multitask: task_ids)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr)

    def outputs(self):
        """The model's output for the batch with labels: the step's forward (the model in train mode)."""
        self.model.train()
        return self.model(
            input_ids=self.input_ids, attention_mask=self.attention_mask, labels=self.input_ids, **self.extra
        )

    def __call__(self) -> float:
        out = self.outputs()
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()


def _to_fp32(output):
    """``output`` with its fp16 / bf16 tensors cast to fp32 (accelerate's ``convert_to_fp32``)."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.dtype in (torch.float16, torch.bfloat16) else output
    if isinstance(output, dict):  # ModelOutput too
        for key, value in output.items():
            output[key] = _to_fp32(value)
    return output


@contextlib.contextmanager
def autocast_forward(model, dtype: torch.dtype):
    """While open, ``model.forward`` is what ``Accelerator(mixed_precision=...).prepare`` sets on the
    instance: ``torch.autocast(device, dtype)`` around ``model.forward.__func__``, outputs cast to fp32,
    each layer a ``functools.wraps`` wrapper (so a model that passed over such a wrapper would show here
    as an fp32 step). Removed again on exit."""
    function = model.forward.__func__
    device_type = model.device.type

    @functools.wraps(function)
    def forward(self, *args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return _to_fp32(function(self, *args, **kwargs))

    model.forward = types.MethodType(forward, model)
    try:
        yield model
    finally:
        del model.forward


class MixedPrecisionStep(TrainStep):
    """:class:`TrainStep` under ``autocast_forward(model, dtype)``; fp16 scales the loss with a
    ``torch.amp.GradScaler`` (``Trainer(fp16=True)``), bf16 does not."""

    def __init__(self, model, batch: int, seq: int, dtype: torch.dtype, **kwargs):
        super().__init__(model, batch, seq, **kwargs)
        self.dtype = dtype
        enabled = dtype == torch.float16
        self.scaler = torch.amp.GradScaler(model.device.type, enabled=enabled)

    def __call__(self) -> torch.Tensor:
        self.model.train()
        with autocast_forward(self.model, self.dtype) as model:
            out = model(input_ids=self.input_ids, attention_mask=self.attention_mask, labels=self.input_ids)
        self.scaler.scale(out.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()


@contextlib.contextmanager
def _same_prompt_tables(models: dict):
    """While open, fastprompt's prompt tables hold PEFT's (timed steps may have trained them apart)."""
    pairs = [
        (models["fastprompt"].prompt_encoder[name].embedding.weight, encoder.embedding.weight)
        for name, encoder in models["peft"].prompt_encoder.items()
    ]
    saved = [fast.detach().clone() for fast, _ in pairs]
    with torch.no_grad():
        for fast, reference in pairs:
            fast.copy_(reference)
    try:
        yield
    finally:
        with torch.no_grad():
            for (fast, _), table in zip(pairs, saved, strict=True):
                fast.copy_(table)


def autocast_check(models: dict, dtype: torch.dtype, batch: int = 4, seq: int = 32) -> tuple[bool, str]:
    """(ok, what was seen): under ``autocast_forward`` every model's base model runs with autocast on and
    its logits come back fp32, and fastprompt's logits are close to PEFT's (bf16/fp16 tolerance; with
    PEFT's prompt tables, put back after)."""
    ids = token_batch(models["peft"], batch, seq)
    seen, logits = {}, {}
    for name, model in models.items():
        states: list[bool] = []
        base = model.get_base_model()
        hook = base.register_forward_pre_hook(
            lambda module, args, states=states, kind=base.device.type: states.append(
                torch.is_autocast_enabled(kind)
            )
        )
        try:
            with torch.no_grad(), _same_prompt_tables(models), autocast_forward(model.eval(), dtype):
                logits[name] = model(input_ids=ids).logits
        finally:
            hook.remove()
        seen[name] = states
    active = all(states == [True] for states in seen.values())
    fp32 = all(value.dtype == torch.float32 for value in logits.values())
    close = bool(torch.allclose(logits["fastprompt"], logits["peft"], atol=3e-2, rtol=3e-2))
    detail = f"autocast inside the base model {seen}, fp32 outputs {fp32}, logits close to PEFT's {close}"
    return active and fp32 and close, detail


def _version(text: str) -> tuple[int, ...]:
    """(major, minor) of a version string: ``"5.24.0"`` -> (5, 24)."""
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


PEFT_CACHE_NOTE = (
    "peft generation timed with use_cache=False: PEFT {peft} re-inserts the prompts into its KV cache at "
    "every step on transformers {transformers} (wrong tokens after the first), so uncached decoding is "
    "what a PEFT user can use correctly there"
)


def peft_generation_uses_cache() -> tuple[bool, str | None]:
    """(use_cache for PEFT's own generation, the note saying why not, or None).

    PEFT 0.21 reads the cache under the argument name transformers used before 5.24 (``past_key_values``);
    on transformers >= 5.24 it no longer sees the cache, adds the prompts again at every step, and its
    cached greedy output is wrong. There the ``peft`` generation is timed without a cache (slower, but
    right); fastprompt always uses its cache.
    """
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        return True, None
    if _version(transformers.__version__) >= (5, 24) and _version(peft_version) < (0, 22):
        return False, PEFT_CACHE_NOTE.format(peft=peft_version, transformers=transformers.__version__)
    return True, None


def max_positions(model) -> int | None:
    """How many positions ``model`` takes (its config's ``max_position_embeddings``), or None: no limit."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return value if isinstance(value, int) and value > 0 else None


def fit_lengths(lengths: dict[str, int], prompt_tokens: int, limit: int | None) -> dict[str, int] | None:
    """``lengths`` (name -> tokens, in the order they are used) shrunk to fit ``limit`` positions after
    ``prompt_tokens`` virtual tokens; unchanged when they fit or there is no limit; None when not even
    one token of each fits.

    Each length keeps its share of the room: {"prompt": 16, "new": 16} in 20 positions after 4 virtual
    tokens becomes {"prompt": 8, "new": 8}.
    """
    if limit is None or prompt_tokens + sum(lengths.values()) <= limit:
        return dict(lengths)
    room = limit - prompt_tokens
    if room < len(lengths):
        return None
    total = sum(lengths.values())
    fitted = {name: max(1, n * room // total) for name, n in lengths.items()}
    while sum(fitted.values()) > room:  # the floor of 1 can overshoot: take from the longest
        longest = max(fitted, key=fitted.get)
        fitted[longest] -= 1
    return fitted
