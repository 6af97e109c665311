"""``python -m fastprompt bench``: a compact grid on whatever device is present, PEFT vs fastprompt.

For each shape of the grid (``QUICK_SHAPES``, or shapes from ``--model``'s own table) every provider's
result is checked against ``peft`` first, then the providers are timed side by side and their peak
memory measured. Then the model-level workloads of a prompt-tuned model: one training step and greedy
generation, PEFT vs fastprompt, after a check that both give the same logits.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch

from ..testing.tiny_models import prompt_tuned_pair, token_batch
from .measure import copy_bandwidth, peak_extra_bytes, timings_each
from .models import TrainStep, greedy_generate
from .providers import PROVIDERS, assert_matches_peft, make_inputs, op_call
from .report import Result
from .shapes import QUICK_SHAPES, Shape, bytes_moved, device_kind

MODEL_PROMPT_TOKENS = 20


def progress(message: str) -> None:
    """One progress line on stderr (the table goes to stdout)."""
    print(f"[fastprompt bench] {message}", file=sys.stderr, flush=True)


def model_shapes(model) -> list[tuple[Shape, bool]]:
    """The grid for a real model: its own D, vocabulary and dtype, a short request and a batch of 8 x 512."""
    table = model.get_input_embeddings().weight
    vocab, dim = table.shape
    kw = dict(word_dtype=table.dtype, prompt_dtype=torch.float32, vocab=vocab, source="--model")
    return [(Shape(1, 20, 128, dim, **kw), False), (Shape(8, 20, 512, dim, **kw), True)]


def op_results(
    shape: Shape,
    device: torch.device,
    *,
    backward: bool,
    providers: tuple[str, ...],
    budget_s: float,
    copy_gbps: float | None,
    word_weight: torch.Tensor | None = None,
) -> list[Result]:
    """Check, measure memory and time every provider on one shape (forward, or forward+backward)."""
    workload = "forward+backward" if backward else "forward"
    inputs = make_inputs(shape, device, backward=backward, word_weight=word_weight)
    calls: dict[str, Callable[[], object]] = {}
    matches = {}
    for name in providers:
        progress(
            f"{workload} {shape.title}: {name} (check against peft{', compile' if name == 'compile' else ''})"
        )
        try:
            assert_matches_peft(name, inputs, backward=backward)
            matches[name] = True
        except AssertionError as err:
            progress(f"MISMATCH {workload} {shape.title} {name}: {err}")
            matches[name] = False
        calls[name] = op_call(name, inputs, backward=backward)
    peaks = {name: peak_extra_bytes(call, device) for name, call in calls.items()}
    progress(f"{workload} {shape.title}: timing {', '.join(calls)}")
    timings = timings_each(calls, device, budget_s=budget_s)
    nbytes = bytes_moved(shape, backward=backward, index_bytes=inputs.input_ids.element_size())
    return [
        Result(
            workload,
            shape.title,
            name,
            timings[name].median,
            nbytes,
            peaks[name],
            copy_gbps,
            matches_peft=matches[name],
            spread=timings[name].spread,
        )
        for name in calls
    ]


def model_results(base_model, label: str, device: torch.device, *, budget_s: float) -> list[Result]:
    """One training step and greedy generation of ``base_model`` prompt-tuned by PEFT and by fastprompt."""
    progress(f"model {label}: building the PEFT and fastprompt prompt-tuned models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = dict(
            zip(("peft", "fastprompt"), prompt_tuned_pair(base_model, MODEL_PROMPT_TOKENS), strict=True)
        )
    ids = token_batch(models["peft"], 4, 32)
    with torch.no_grad():
        logits = {name: m.eval()(input_ids=ids).logits for name, m in models.items()}
    same = bool(torch.allclose(logits["peft"], logits["fastprompt"], atol=1e-5, rtol=1e-4))
    if not same:
        progress(f"MISMATCH model {label}: fastprompt's logits differ from PEFT's")
    matches = {"peft": True, "fastprompt": same}
    results = []
    workloads = {
        f"train step B=8 L=64 T={MODEL_PROMPT_TOKENS}": lambda m: TrainStep(m, 8, 64),
        f"generate 16 tok B=2 L=16 T={MODEL_PROMPT_TOKENS}": lambda m: _generation(m),
    }
    for workload, make in workloads.items():
        progress(f"model {label}: {workload}")
        calls = {name: make(m) for name, m in models.items()}
        # peak_extra_bytes warms up first: AdamW's state (created on the first step) is not counted.
        peaks = {name: peak_extra_bytes(call, device) for name, call in calls.items()}
        timings = timings_each(calls, device, budget_s=budget_s)
        results += [
            Result(
                workload,
                label,
                name,
                timings[name].median,
                None,
                peaks[name],
                matches_peft=matches[name],
                spread=timings[name].spread,
            )
            for name in calls
        ]
    return results


def _generation(model) -> Callable[[], torch.Tensor]:
    """Greedy generation of 16 tokens after a fixed random batch of 2 x 16 tokens."""
    prompt = token_batch(model, 2, 16, seed=1)
    return lambda: greedy_generate(model, prompt, 16)


def run_grid(
    device: torch.device,
    *,
    base_model=None,
    model_label: str = "",
    real_model: bool = False,
    providers: tuple[str, ...] = PROVIDERS,
    budget_s: float = 0.4,
    with_model: bool = True,
) -> list[Result]:
    """The whole grid: op-level shapes, then (``with_model``) the model-level workloads.

    ``base_model`` is the model of the model-level rows (None: none); with ``real_model`` the op-level
    shapes also come from it (its embedding table, D, vocabulary and dtype).
    """
    copy_gbps = None
    if device.type == "cuda":
        progress("measuring a device-to-device copy's bandwidth")
        copy_gbps = copy_bandwidth(device)
    if real_model:
        grid = model_shapes(base_model)
        table = base_model.get_input_embeddings().weight
    else:
        grid = list(QUICK_SHAPES[device_kind(device)])
        table = None
    results = []
    for i, (shape, with_backward) in enumerate(grid, 1):
        progress(f"shape {i}/{len(grid)}: {shape.title} ({shape.source})")
        for backward in (False, True) if with_backward else (False,):
            results += op_results(
                shape,
                device,
                backward=backward,
                providers=providers,
                budget_s=budget_s,
                copy_gbps=copy_gbps,
                word_weight=table,
            )
    if with_model and base_model is not None:
        results += model_results(base_model, model_label, device, budget_s=budget_s)
    return results
