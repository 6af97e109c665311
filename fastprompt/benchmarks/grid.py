"""``python -m fastprompt bench``: a compact grid on whatever device is present, PEFT vs fastprompt.

For each shape of the grid (``QUICK_SHAPES``, or shapes from ``--model``'s own table) every provider's
result is checked against ``peft`` first, then the providers are timed side by side and their peak
memory measured. Then the model-level workloads of a prompt-tuned model: one training step (fp32, and
bf16 under the autocast wrapper ``Trainer(bf16=True)`` sets on ``model.forward``) and greedy generation,
PEFT vs fastprompt, after a check that both give the same logits (under bf16: that autocast reaches the
base model of both). With the built-in models, the rows beyond PEFT follow: mixed-adapter batches,
prompt-KV reuse, and training steps of a 4-layer Llama (shared prompt prefix, TRL's fused LM head, packed
rows).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch

from ..testing.tiny_models import prompt_tuned_pair, token_batch
from .measure import copy_bandwidth, peak_extra_bytes, timings_each
from .models import (
    MixedPrecisionStep,
    TrainStep,
    autocast_check,
    fit_lengths,
    greedy_generate,
    max_positions,
    peft_generation_uses_cache,
)
from .providers import PROVIDERS, assert_matches_peft, make_inputs, op_call
from .report import Result, timed_result
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
        timed_result(
            workload,
            shape.title,
            name,
            timings[name],
            peaks[name],
            bytes_moved=nbytes,
            copy_gbps=copy_gbps,
            matches_peft=matches[name],
        )
        for name in calls
    ]


TRAIN_LENGTHS = {"seq": 64}
GENERATE_LENGTHS = {"prompt": 16, "new": 16}


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def model_results(
    base_model, label: str, device: torch.device, *, budget_s: float, notes: list[str] | None = None
) -> list[Result]:
    """One training step and greedy generation of ``base_model`` prompt-tuned by PEFT and by fastprompt.

    Lengths are fitted to the model's positions (``fit_lengths``); what was shrunk, skipped or failed
    is appended to ``notes`` (one line each) and the other workloads still run. On transformers >= 5.24
    PEFT's generation is timed without a cache (``peft_generation_uses_cache``), which the note says.
    """
    notes = [] if notes is None else notes
    tokens = MODEL_PROMPT_TOKENS
    limit = max_positions(base_model)
    train = fit_lengths(TRAIN_LENGTHS, tokens, limit)
    generate = fit_lengths(GENERATE_LENGTHS, tokens, limit)
    for name, wanted, fitted in (
        ("train step", TRAIN_LENGTHS, train),
        ("generate", GENERATE_LENGTHS, generate),
    ):
        if fitted is None:
            room = f"{limit} positions leave no room after {tokens} virtual tokens"
            notes.append(f"model {label}: {name} skipped: {room}")
        elif fitted != wanted:
            notes.append(
                f"model {label}: {name} shrunk to {fitted} (from {wanted}) to fit its {limit} positions "
                f"after {tokens} virtual tokens"
            )
    if train is None and generate is None:
        return []
    progress(f"model {label}: building the PEFT and fastprompt prompt-tuned models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = dict(zip(("peft", "fastprompt"), prompt_tuned_pair(base_model, tokens), strict=True))
    peft_cache, cache_note = peft_generation_uses_cache()
    if cache_note and generate is not None:
        notes.append(cache_note)
    workloads = {}
    if train is not None:
        seq = train["seq"]
        workloads[f"train step B=8 L={seq} T={tokens}"] = (
            lambda m: TrainStep(m, 8, seq),
            lambda: _same_logits(models, min(32, seq)),
        )
        workloads[f"train step bf16 autocast B=8 L={seq} T={tokens}"] = (
            lambda m: MixedPrecisionStep(m, 8, seq, torch.bfloat16),
            lambda: _autocast_reaches_base(models, label, min(32, seq)),
        )
    if generate is not None:
        prompt, new = generate["prompt"], generate["new"]
        peft_label = "" if peft_cache else ", peft uncached"
        workloads[f"generate {new} tok B=2 L={prompt} T={tokens}{peft_label}"] = (
            lambda m: _generation(m, prompt, new, use_cache=peft_cache or m is models["fastprompt"]),
            lambda: _same_generation(models, prompt, new, peft_cache),
        )
    results = []
    for workload, (make, check) in workloads.items():
        progress(f"model {label}: {workload}")
        try:
            same = check()
            if not same:
                progress(f"MISMATCH model {label} {workload}: fastprompt differs from PEFT")
            calls = {name: make(m) for name, m in models.items()}
            # peak_extra_bytes warms up first: AdamW's state (created on the first step) is not counted.
            peaks = {name: peak_extra_bytes(call, device) for name, call in calls.items()}
            timings = timings_each(calls, device, budget_s=budget_s)
        except Exception as err:  # one workload that cannot run must not lose the rows measured so far
            notes.append(f"model {label}: {workload} failed: {_first_line(err)}")
            progress(notes[-1])
            continue
        matches = {"peft": True, "fastprompt": same}
        results += [
            timed_result(workload, label, name, timings[name], peaks[name], matches_peft=matches[name])
            for name in calls
        ]
    return results


def _same_logits(models: dict, seq: int) -> bool:
    """fastprompt's logits equal PEFT's on a random 4 x ``seq`` batch."""
    ids = token_batch(models["peft"], 4, seq)
    with torch.no_grad():
        logits = {name: m.eval()(input_ids=ids).logits for name, m in models.items()}
    return bool(torch.allclose(logits["peft"], logits["fastprompt"], atol=1e-5, rtol=1e-4))


def _autocast_reaches_base(models: dict, label: str, seq: int) -> bool:
    """Under bf16 autocast set on ``model.forward``: autocast inside both base models, logits close."""
    ok, detail = autocast_check(models, torch.bfloat16, seq=seq)
    if not ok:
        progress(f"model {label}: bf16 autocast: {detail}")
    return ok


# PEFT's own forward warns about the position ids that transformers' generation builds at every step
# (not the user's: PEFT ignores them); the ``peft`` generation rows run PEFT's code, so the bench
# silences that one warning for every provider alike (fastprompt's generate never passes them on).
_PEFT_POSITION_IDS_WARNING = "Position ids are not supported for parameter efficient tuning"


def _greedy(model, ids: torch.Tensor, new: int, *, use_cache: bool = True) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PEFT_POSITION_IDS_WARNING, category=UserWarning)
        return greedy_generate(model, ids, new, use_cache=use_cache)


def _same_generation(models: dict, prompt: int, new: int, peft_cache: bool) -> bool:
    """fastprompt's cached greedy tokens equal PEFT's (uncached where PEFT's cache is wrong)."""
    ids = token_batch(models["peft"], 2, prompt, seed=1)
    peft_tokens = _greedy(models["peft"], ids, new, use_cache=peft_cache)
    return bool(torch.equal(peft_tokens, _greedy(models["fastprompt"], ids, new)))


def _generation(model, prompt: int, new: int, *, use_cache: bool) -> Callable[[], torch.Tensor]:
    """Greedy generation of ``new`` tokens after a fixed random batch of 2 x ``prompt`` tokens."""
    ids = token_batch(model, 2, prompt, seed=1)
    return lambda: _greedy(model, ids, new, use_cache=use_cache)


def run_grid(
    device: torch.device,
    *,
    base_model=None,
    model_label: str = "",
    real_model: bool = False,
    providers: tuple[str, ...] = PROVIDERS,
    budget_s: float = 0.4,
    with_model: bool = True,
    notes: list[str] | None = None,
    beyond_peft: bool = False,
) -> list[Result]:
    """The whole grid: op-level shapes, then (``with_model``) the model-level workloads, then
    (``beyond_peft``) mixed-adapter batches and prompt-KV reuse on the built-in tiny Llama, and training
    steps on a 4-layer Llama: with the shared prompt prefix, prefix tuning's, through TRL's fused LM head
    (where TRL is installed), and on packed rows against PEFT's padded batch and the no-prompt floor.

    ``base_model`` is the model of the model-level rows (None: none); with ``real_model`` the op-level
    shapes also come from it (its embedding table, D, vocabulary and dtype). What was shrunk, skipped
    or failed is appended to ``notes``.
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
        results += model_results(base_model, model_label, device, budget_s=budget_s, notes=notes)
    if beyond_peft:
        from ..testing.tiny_models import load_base_model
        from .mixed import mixed_results
        from .prompt_kv import prompt_kv_results

        llama = load_base_model("tiny-llama").to(device)
        results += mixed_results(llama, "tiny-llama", device, budget_s=budget_s, progress=progress)
        # "peft" is left out: its cached generation is wrong on transformers >= 5.24 and uncached it is slow;
        # `python -m fastprompt.benchmarks.prompt_kv` times it.
        results += prompt_kv_results(
            "tiny-llama",
            device,
            budget_s=budget_s,
            progress=progress,
            providers=("reuse", "no reuse", "no prompt"),
        )
        from .shared_prefix import shared_prefix_results

        results += shared_prefix_results(device, budget_s=budget_s, progress=progress, notes=notes)
        from .prefix_tuning import prefix_results

        results += prefix_results(device, budget_s=budget_s, progress=progress)
        from .trl_packed import fused_head_results, packed_results, trl_available

        if trl_available():
            results += fused_head_results(device, budget_s=budget_s, progress=progress, notes=notes)
        elif notes is not None:
            notes.append("train step TRL fused head skipped: TRL is not installed (pip install trl)")
        results += packed_results(device, budget_s=budget_s, progress=progress, notes=notes)
    return results
