"""Training with the shared prompt prefix measured: one prompt-tuning step, PEFT against fastprompt.

Also P-tuning (MLP encoder) and multitask prompt tuning steps (``METHODS``, at ``METHOD_SHAPES``).

The model: a Llama built here from a config (``BENCH_LLAMA``: hidden 256, 4 layers, vocabulary 8000),
random weights, no dropout; at ``FAMILY_SHAPE`` also a Qwen3 and a Qwen3-MoE of the same size
(``BENCH_MODELS``), the families users fine-tune most, sharing by the same generic machinery. The
workload: one training step (forward with labels, backward, AdamW step on the prompt table) at each
(N, L, B) of ``SHAPES``, on the same base weights and prompt table.

Providers:

- ``peft``: PEFT's own model (the N virtual tokens run through every layer for every row);
- ``fastprompt``: fastprompt's model with its default ``share_prompt_prefix=None`` (the prompt runs once
  per batch where the cost rule says it pays, else PEFT's path with the fused concat);
- ``no share``: fastprompt with ``share_prompt_prefix=False`` (only in ``python -m
  fastprompt.benchmarks.shared_prefix --providers ...``).

Before timing, the first step's loss and prompt gradient of every provider are checked against PEFT's
(fp32 rounding). ``Result.speedup`` is PEFT's time over the row's; ``memory_ratio`` the row's peak over
PEFT's. Entry points: :func:`shared_prefix_results` (the CLI's rows), :func:`train_steps`
(``bench/test_bench_shared_prefix.py``); ``python -m fastprompt.benchmarks.shared_prefix`` prints a table.
"""

from __future__ import annotations

import copy
import warnings

import torch

from .measure import peak_extra_bytes, timings_each
from .models import TrainStep
from .report import Result, timed_result

SHAPES = ((100, 64, 8), (20, 128, 8), (8, 128, 2), (200, 256, 4))  # (N, L, B)
PROVIDERS = ("peft", "fastprompt", "no share")
DEFAULT_PROVIDERS = ("peft", "fastprompt")
MODEL_LABEL = "bench-llama"

BENCH_LLAMA = dict(
    vocab_size=8000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


# The same size in Qwen3 (QK-norm) and Qwen3-MoE (8 experts, 2 per token, expert width 688 / 4).
_QWEN3 = {**BENCH_LLAMA, "head_dim": 64}
BENCH_MODELS = {
    MODEL_LABEL: ("LlamaConfig", BENCH_LLAMA),
    "bench-qwen3": ("Qwen3Config", _QWEN3),
    "bench-qwen3-moe": (
        "Qwen3MoeConfig",
        {**_QWEN3, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 172},
    ),
}
# A hybrid of the same size: Qwen3.5's gated delta-net linear-attention layers (3 of 4) beside attention,
# whose prompt state (convolution windows, recurrent states, keys/values) is shared.
BENCH_MODELS["bench-qwen3.5"] = (
    "Qwen3_5TextConfig",
    {
        **_QWEN3,
        "linear_num_key_heads": 4,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 64,
        "linear_value_head_dim": 64,
    },
)
FAMILY_SHAPE = (100, 64, 8)  # where the other families are timed too
FAMILIES = ("bench-qwen3", "bench-qwen3-moe", "bench-qwen3.5")


def has_model(model: str) -> bool:
    """Whether the installed transformers has the config class of a ``BENCH_MODELS`` entry (Qwen3.5's
    arrived in 5.x)."""
    import transformers

    return hasattr(transformers, BENCH_MODELS[model][0])


def base_model(*, seed: int = 0, model: str = MODEL_LABEL):
    """A benchmark model of ``BENCH_MODELS`` (default the Llama), random weights, no dropout."""
    import transformers

    config_class, fields = BENCH_MODELS[model]
    config = getattr(transformers, config_class)(**fields)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def _copy(base, prepare):
    """A deep copy of ``base``, then ``prepare(copy)`` (in place) where given."""
    model = copy.deepcopy(base)
    if prepare is not None:
        prepare(model)
    return model


# The soft-prompt methods timed: prompt tuning at every shape of SHAPES; P-tuning (MLP encoder, hidden
# 256 as the example) and multitask prompt tuning (4 tasks, rank 1; the batch's rows spread over
# 2 tasks) at METHOD_SHAPES.
METHODS = ("prompt tuning", "p-tuning mlp", "multitask")
METHOD_SHAPES = ((100, 64, 8), (8, 128, 2))  # where sharing pays most, and where the rule declines
MULTITASK_TASKS = 4


def method_config(method: str, num_virtual_tokens: int):
    """PEFT's config of ``method`` (one of ``METHODS``) for a CAUSAL_LM model."""
    import peft

    if method == "p-tuning mlp":
        return peft.PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=256
        )
    if method == "multitask":
        return peft.MultitaskPromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, num_tasks=MULTITASK_TASKS
        )
    return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)


def _extra(method: str, batch: int) -> dict:
    """More keywords of each step's call: multitask's ``task_ids`` (rows alternate tasks 1 and 3)."""
    if method != "multitask":
        return {}
    return {"task_ids": torch.tensor([1 + 2 * (b % 2) for b in range(batch)])}


def provider_models(
    base, num_virtual_tokens: int, providers, seed: int, prepare=None, method: str = "prompt tuning"
) -> dict:
    """{provider: prompt-tuned model} on copies of ``base`` with the same prompt table (or encoder);
    ``prepare`` is applied to each copy before it is wrapped (e.g. TRL's ``add_fused_lm_head``, which must
    come first)."""
    import peft

    import fastprompt

    config = method_config(method, num_virtual_tokens)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {"peft": peft.get_peft_model(_copy(base, prepare), config)}
        for name in providers:
            if name != "peft":
                share = None if name == "fastprompt" else False
                model = fastprompt.get_peft_model(_copy(base, prepare), config, share_prompt_prefix=share)
                model.load_state_dict(models["peft"].state_dict())
                models[name] = model
    return models


def train_steps(
    base,
    shape: tuple[int, int, int],
    providers=DEFAULT_PROVIDERS,
    *,
    seed: int = 0,
    step=TrainStep,
    prepare=None,
    method: str = METHODS[0],
) -> dict:
    """{provider: step} for one (N, L, B), every provider on the same batch and prompt table (or encoder);
    ``step`` is the step's class (``TrainStep``'s signature), ``prepare`` what is done to each base copy
    first, ``method`` the soft-prompt method (of ``METHODS``)."""
    n, length, batch = shape
    models = provider_models(base, n, providers, seed, prepare, method)
    extra = _extra(method, batch)
    return {name: step(models[name], batch, length, seed=seed, extra=extra) for name in providers}


def first_step_matches(steps: dict) -> dict[str, bool]:
    """Each provider's loss and prompt gradient of one step against PEFT's (fp32 rounding)."""
    outcome = {}
    reference = None
    for name in ("peft", *[p for p in steps if p != "peft"]):
        step = steps[name]
        out = step.outputs()
        out.loss.backward()
        grad = step.model.prompt_encoder["default"].embedding.weight.grad.detach().clone()
        step.model.zero_grad(set_to_none=True)
        if reference is None:
            reference = (out.loss.detach(), grad)
        loss_ok = torch.allclose(out.loss.detach(), reference[0], rtol=1e-5, atol=1e-6)
        grad_ok = (grad - reference[1]).abs().max() <= 1e-4 * reference[1].abs().max()
        outcome[name] = bool(loss_ok and grad_ok)
    return outcome


def timed_rows(
    workload: str,
    calls: dict,
    matches: dict[str, bool],
    device,
    *,
    budget_s: float,
    reference: str = "peft",
    model: str = MODEL_LABEL,
) -> list[Result]:
    """The calls' peak memory, then their times side by side: one row each, with the speedup and memory
    ratio against ``reference``'s row and whether it matched (``matches``)."""
    peaks = {name: peak_extra_bytes(call, device) for name, call in calls.items()}
    timings = timings_each(calls, device, budget_s=budget_s)
    reference_time, reference_peak = timings[reference].median, peaks[reference]
    return [
        timed_result(
            workload,
            model,
            name,
            timings[name],
            peaks[name],
            speedup=reference_time / timings[name].median,
            memory_ratio=peaks[name] / reference_peak if peaks[name] is not None and reference_peak else None,
            matches_peft=matches[name],
        )
        for name in calls
    ]


def shared_prefix_results(
    device,
    *,
    budget_s: float = 0.4,
    shapes=SHAPES,
    providers=DEFAULT_PROVIDERS,
    progress=print,
    seed=0,
    notes: list[str] | None = None,
    steps=train_steps,
    label: str = "train step",
    methods=METHODS[1:],
    families=FAMILIES,
) -> list[Result]:
    """One row per (shape, provider): time of one training step, peak memory, speedup and memory ratio
    against ``peft`` (always run), and whether the first step matched PEFT's. Which shapes fastprompt's
    default shared the prompt at is appended to ``notes`` (and said by ``progress``). ``steps`` builds
    the steps (``train_steps``'s signature), ``label`` starts each row's workload; ``methods``: the other
    soft-prompt methods (of ``METHODS``) also timed, at ``METHOD_SHAPES``; ``families``: the other models
    (of ``BENCH_MODELS``) also timed, prompt tuning at ``FAMILY_SHAPE``."""
    from ..prompt_once import policy as shared_prefix

    providers = ("peft", *[p for p in providers if p != "peft"])
    bases = {MODEL_LABEL: base_model(seed=seed).to(device)}
    results, shared_at = [], []
    cases = [(MODEL_LABEL, METHODS[0], shape) for shape in shapes]
    cases += [(MODEL_LABEL, method, shape) for method in (methods or ()) for shape in METHOD_SHAPES]
    cases += [(family, METHODS[0], FAMILY_SHAPE) for family in (families or ()) if has_model(family)]
    for model, method, shape in cases:
        if model not in bases:
            bases[model] = base_model(seed=seed, model=model).to(device)
        n, length, batch = shape
        prefix = "" if method == METHODS[0] else f"{method} "
        workload = f"{prefix}{label} N={n} L={length} B={batch}"
        by_method = {} if method == METHODS[0] else {"method": method}
        calls = steps(bases[model], shape, providers, seed=seed, **by_method)
        before = shared_prefix.CALLS["shared"]
        matches = first_step_matches(calls)
        shares = shared_prefix.CALLS["shared"] > before
        progress(f"model {model}: {workload} (fastprompt {'shares' if shares else 'does not share'})")
        where = "" if model == MODEL_LABEL else f"{model} "
        shared_at.append(f"{'' if shares else 'not '}at {where}{prefix}N={n} L={length} B={batch}")
        for name, ok in matches.items():
            if not ok:
                progress(f"MISMATCH model {model}: {workload}: {name} differs from peft")
        results += timed_rows(workload, calls, matches, device, budget_s=budget_s, model=model)
    if notes is not None:
        notes.append(f"{MODEL_LABEL}, {label}: fastprompt's default shared the prompt {', '.join(shared_at)}")
    return results


def results_table(results: list[Result]) -> str:
    lines = ["| model | workload | provider | median ms | IQR/med | vs peft | peak MB | vs peft mem | same |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        peak = "" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.1f}"
        memory = "" if r.memory_ratio is None else f"{r.memory_ratio:.2f}x"
        lines.append(
            f"| {r.shape} | {r.workload} | {r.provider} | {r.seconds * 1e3:.1f} | {r.spread:.0%} | "
            f"{r.speedup:.2f}x | "
            f"{peak} | {memory} | {'yes' if r.matches_peft else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import sys

    from .measure import keep_freed_memory
    from .shapes import bench_device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1.0, help="timing seconds per provider and shape")
    parser.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS), help=f"of {', '.join(PROVIDERS)}")
    parser.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES), help="N,L,B;...")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS[1:]),
        help=f"also time these at {METHOD_SHAPES}: of {METHODS[1:]}",
    )
    parser.add_argument(
        "--families",
        default=",".join(FAMILIES),
        help=f"also time these models at {FAMILY_SHAPE}: of {FAMILIES}",
    )
    args = parser.parse_args(argv)
    device = bench_device()
    if device.type == "cpu":
        keep_freed_memory()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    results = shared_prefix_results(
        device,
        budget_s=args.budget,
        shapes=shapes,
        providers=args.providers.split(","),
        progress=lambda msg: print(msg, file=sys.stderr),
        methods=[m for m in args.methods.split(",") if m],
        families=[f for f in args.families.split(",") if f],
    )
    print(results_table(results), flush=True)
    return 0 if all(r.matches_peft for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
