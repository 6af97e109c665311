"""Mixed-adapter batches measured: K prompt-tuning adapters x R rows in one batch, against the alternatives.

The workloads, each on the same B = K * R rows (row r of adapter k at position k * R + r, interleaved
so the mixed batch really mixes):

- ``loop``: what a PEFT user must do today: one sub-batch per adapter after ``set_adapter``, the
  outputs concatenated. Run on the fastprompt-accelerated model, so the only difference to ``mixed`` is
  the batching (PEFT 0.21.2's cached generation is wrong on transformers >= 5.24).
- ``mixed``: one call with ``adapter_names=[...]`` (one ``prompt_concat`` for the whole batch).
- ``one adapter``: the same B rows all with one adapter, one call: the floor of ``mixed``.

Forward (logits, no grad) and greedy generation. ``mixed`` is checked against ``loop`` before timing.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .benchmarking import peak_extra_bytes, timings_each
from .report import Result

ADAPTERS = 4
ROWS_PER_ADAPTER = 4
NUM_VIRTUAL_TOKENS = 20
FORWARD_LEN = 32
GENERATE_LEN = 16
NEW_TOKENS = 8
PROVIDERS = ("loop", "mixed", "one adapter")


@dataclass
class MixedModel:
    """A fastprompt prompt-tuned model with ``ADAPTERS`` adapters and the batch that mixes them."""

    model: torch.nn.Module
    names: list[str]  # one adapter name per batch row
    adapters: list[str]  # the distinct adapters, in order


def mixed_model(base_model, *, adapters: int = ADAPTERS, rows: int = ROWS_PER_ADAPTER, seed: int = 0):
    """``base_model`` (copied) prompt-tuned with ``adapters`` RANDOM adapters of N=20 by fastprompt."""
    from peft import PromptTuningConfig

    from fastprompt import get_peft_model

    config = dict(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    names = [f"task{k}" for k in range(adapters)]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base_model), PromptTuningConfig(**config), adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, PromptTuningConfig(**config))
    return MixedModel(model.eval(), [names[i % adapters] for i in range(adapters * rows)], names)


def _token_batch(model, batch: int, seq: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(2, vocab, (batch, seq), generator=gen).to(model.device)


def _forward(model, input_ids, mask, **kwargs) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=mask, **kwargs).logits


def _greedy(model, input_ids, mask, **kwargs) -> torch.Tensor:
    return model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
        **kwargs,
    )


def _calls(mixed: MixedModel, input_ids: torch.Tensor, run) -> dict[str, Callable[[], torch.Tensor]]:
    """The three providers of workload ``run(model, input_ids, mask, **kwargs) -> Tensor [B, ...]``."""
    model, names = mixed.model, mixed.names
    mask = torch.ones_like(input_ids)
    rows = {a: [i for i, n in enumerate(names) if n == a] for a in mixed.adapters}
    order = torch.tensor([i for a in mixed.adapters for i in rows[a]])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())

    def loop():
        outs = []
        for adapter in mixed.adapters:
            model.set_adapter(adapter)
            outs.append(run(model, input_ids[rows[adapter]], mask[rows[adapter]]))
        model.set_adapter(mixed.adapters[0])
        return torch.cat(outs)[inverse]

    return {
        "loop": loop,
        "mixed": lambda: run(model, input_ids, mask, adapter_names=names),
        "one adapter": lambda: run(model, input_ids, mask),
    }


def _check(calls: dict, exact: bool) -> bool:
    with torch.no_grad():
        loop, mixed = calls["loop"](), calls["mixed"]()
    if exact:
        return bool(torch.equal(loop, mixed))
    return bool(torch.allclose(loop, mixed, atol=1e-5, rtol=1e-4))


def mixed_results(base_model, label: str, device, *, budget_s: float, progress=print) -> list[Result]:
    """Forward and greedy generation of a K x R mixed batch: loop, mixed and one-adapter rows.

    ``Result.speedup`` is the ``loop`` time over the row's time; ``memory_ratio`` the row's peak over
    the loop's. ``matches_peft`` says whether ``mixed`` equals the per-adapter loop.
    """
    mixed = mixed_model(base_model)
    batch = len(mixed.names)
    workloads = {
        f"mixed forward K={ADAPTERS}x{ROWS_PER_ADAPTER} L={FORWARD_LEN} T={NUM_VIRTUAL_TOKENS}": _calls(
            mixed, _token_batch(mixed.model, batch, FORWARD_LEN, 1), _forward
        ),
        f"mixed generate {NEW_TOKENS} tok K={ADAPTERS}x{ROWS_PER_ADAPTER} L={GENERATE_LEN} "
        f"T={NUM_VIRTUAL_TOKENS}": _calls(mixed, _token_batch(mixed.model, batch, GENERATE_LEN, 2), _greedy),
    }
    results = []
    for workload, calls in workloads.items():
        progress(f"model {label}: {workload}")
        same = _check(calls, exact="generate" in workload)
        if not same:
            progress(f"MISMATCH model {label}: {workload}: the mixed batch differs from the per-adapter loop")
        with torch.no_grad():
            peaks = {name: peak_extra_bytes(call, device) for name, call in calls.items()}
            timings = timings_each(calls, device, budget_s=budget_s)
        loop = timings["loop"].median
        for name in calls:
            results.append(
                Result(
                    workload,
                    label,
                    name,
                    timings[name].median,
                    None,
                    peaks[name],
                    speedup=loop / timings[name].median,
                    memory_ratio=peaks[name] / peaks["loop"] if peaks["loop"] else None,
                    matches_peft=same if name == "mixed" else True,
                    spread=timings[name].spread,
                )
            )
    return results
