"""The GPU check: one prepared script, ``python bench/gpu_check.py`` on a CUDA machine.

It is designed to end within about 4 minutes on an H200 (``--budget``, default 190 s of work after
start-up, and a hard stop 25 s after that); it has not yet run on a GPU, so that is a design target,
not a measurement. The work is ordered so that what the GPU targets need comes first and the rest
runs while the budget lasts:

1. The bandwidth of a 1 GiB device-to-device copy (the ceiling a gather can reach) and the launch
   of an empty Triton kernel (the floor of any kernel call).
2. The target timings, all providers (``peft``, ``compile``, ``fastprompt``): the forward of a shape
   that moves >= 256 MB (where "not slower than compile" and ">= 90% of copy" apply), and the forward
   at B=1, L=128 (the launch-overhead target), with its wall time per call back to back.
3. Correctness of ``prompt_concat`` for every dtype pair and index mode against float64 (and PEFT's
   path where it applies): ``fastprompt.testing.parity.op_case``, one small shape each (B=3, L=7, D=40), so
   the cost is the kernels' first compiles, not the data.
4. ``torch.compile(fullgraph=True)`` of a function calling ``prompt_concat``: forward and backward
   equal to eager, for each index mode (skipped when under 45 s of the budget is left); then
   forward and backward captured in one CUDA graph and replayed on new inputs (no host sync allowed).
5. The sections (``SECTIONS``): backward kernels, mixed-adapter batches, prompt-KV reuse, a training
   step under bf16 autocast and under fp16 autocast with a GradScaler (as ``Trainer(bf16=True)`` /
   ``fp16=True`` run it), PEFT vs fastprompt: autocast active inside the base model, timings; a training
   step with the shared prompt prefix at the four shapes of issue 15 (and Qwen3 / Qwen3-MoE at N=100 L=64
   B=8, issue 27); the model matrix in bf16 for a handful of families (issue 27); training steps through
   TRL's fused LM head and on packed rows (issue 20); and soft prompts served on vLLM (only where vLLM is
   installed).
6. The rest of ``SUITE_SHAPES["cuda"]``, forward and forward+backward, while the budget lasts (the
   ``compile`` provider only while 45 s are left: its first compile of a shape takes seconds).

Timings: ``triton.testing.do_bench`` (median), on several input sets used in turn (``do_bench`` also
clears L2 between calls). The targets: forward >= 90% of the copy's bandwidth where >= 256 MB must
move; >= 2x ``peft`` and not slower than ``compile``; at B=1, L=128 a call within 1.5x of the empty
kernel's launch.

Prints markdown (paste it into bench/RESULTS.md), each section as soon as it is done. Exit code 1 if a
correctness check fails (checks the budget left out are listed as not run); the targets are reported,
not enforced. Written for torch >= 2.4 / triton >= 3.0 (the GPU image has torch 2.11, triton 3.6,
transformers 5.17). Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import signal
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the compiled kernels, never the interpreter

import torch  # noqa: E402

from fastprompt.benchmarks import (  # noqa: E402
    PROVIDERS,
    SUITE_SHAPES,
    TARGET_SHAPE,
    bytes_moved,
    copy_bandwidth,
    make_inputs,
    median_seconds,
    op_call,
    peak_extra_bytes,
    timings_each,
)
from fastprompt.benchmarks.report import Result, text_table, with_speedups  # noqa: E402

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _empty_kernel(x_ptr, n: tl.constexpr):
        """Does nothing: its launch is the floor of any kernel call."""
        pass

except ImportError:  # no triton: main() stops before anything needs it
    triton = None

BIG_BYTES = 256 * 10**6
START = time.perf_counter()
COMPILE_RESERVE_S = 45.0  # a first inductor compile of a shape (forward+backward) takes seconds
HARD_STOP_AFTER_S = 25.0  # past the budget: whatever runs is interrupted and the results so far printed


class OutOfTime(BaseException):
    """The hard stop: raised by SIGALRM; a BaseException so no ``except Exception`` swallows it."""


def elapsed() -> float:
    """Seconds since the script started (after importing torch)."""
    return time.perf_counter() - START


def log(message: str) -> None:
    """Progress on stderr, with the seconds elapsed."""
    print(f"[gpu_check {elapsed():6.1f}s] {message}", file=sys.stderr, flush=True)


def emit(text: str = "") -> None:
    """A line of the markdown report, flushed at once (a killed run still leaves what it printed)."""
    print(text, flush=True)


class Budget:
    """Seconds of work left before the soft deadline ``budget_s`` (after which optional work is skipped)."""

    def __init__(self, budget_s: float):
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - elapsed()


def correctness(device: torch.device, budget: Budget) -> tuple[list[tuple[bool, str]], list[str]]:
    """Every dtype pair and index mode against float64 (and PEFT's path where it applies), one small
    shape each, while the budget lasts: (checks run, cases not run)."""
    from fastprompt.testing.parity import DTYPE_NAMES, op_case, op_cases

    gen = torch.Generator().manual_seed(0)
    checks, skipped = [], []
    for word_dtype, prompt_dtype, mode in op_cases():
        label = f"word={DTYPE_NAMES[word_dtype]} prompt={DTYPE_NAMES[prompt_dtype]} indices={mode}"
        if budget.left() <= 0:
            skipped.append(label)
            continue
        check = op_case(device, word_dtype, prompt_dtype, mode, gen)
        checks.append((check.ok, check.line))
        emit(f"- {'ok' if check.ok else 'FAIL'}: {check.line}")
    return checks, skipped


def compile_fullgraph(device: torch.device, budget: Budget) -> list[tuple[bool, str]]:
    """``torch.compile(fullgraph=True)`` of prompt_concat: forward and prompt gradient equal to eager."""
    import fastprompt

    def fn(ids, word, prompt, indices):
        return fastprompt.prompt_concat(ids, word, prompt, indices) * 1.0

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    gen = torch.Generator(device=device).manual_seed(0)
    lines = []
    for mode in ("all", "shared", "per-batch"):
        if budget.left() < COMPILE_RESERVE_S:
            log(f"compile fullgraph, indices={mode}: skipped (time budget)")
            continue
        try:
            ids = torch.randint(0, 1000, (4, 64), generator=gen, device=device)
            word = torch.randn(1000, 256, generator=gen, device=device).to(torch.bfloat16)
            prompt = torch.randn(16, 256, generator=gen, device=device).requires_grad_()
            indices = {
                "all": None,
                "shared": torch.randint(0, 16, (10,), generator=gen, device=device),
                "per-batch": torch.randint(0, 16, (4, 10), generator=gen, device=device),
            }[mode]
            grad = torch.randn(4, 64 + (16 if indices is None else 10), 256, generator=gen, device=device)
            results = []
            for f in (fn, compiled):
                prompt.grad = None
                out = f(ids, word, prompt, indices)
                out.backward(grad.to(out.dtype))
                results.append((out.detach(), prompt.grad.clone()))
            same_out = torch.equal(results[0][0], results[1][0])
            same_grad = torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)
            verdict = f"forward {'equal' if same_out else 'DIFFERS'}, "
            verdict += f"prompt grad {'equal' if same_grad else 'DIFFERS'}"
            lines.append(
                (same_out and same_grad, f"compile fullgraph, indices={mode:9s} bf16/fp32: {verdict}")
            )
        except Exception as err:  # a graph break or a crash is a failed check, with its reason
            lines.append((False, f"compile fullgraph, indices={mode:9s}: {type(err).__name__}: {err}"))
        emit(f"- {'ok' if lines[-1][0] else 'FAIL'}: {lines[-1][1]}")
    return lines


def cuda_graph_capture(device: torch.device) -> tuple[bool, str]:
    """Forward and backward of prompt_concat captured in one CUDA graph, replayed on new inputs.

    Capture fails on any host sync in the op's hot path (``.item()``, a sync-ing bounds check, ...);
    the replay must equal eager on inputs copied in after the capture.
    """
    import fastprompt

    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, 1000, (4, 64), generator=gen, device=device)
    word = torch.randn(1000, 256, generator=gen, device=device).to(torch.bfloat16)
    prompt = torch.randn(16, 256, generator=gen, device=device).requires_grad_()
    indices = torch.randint(0, 16, (4, 10), generator=gen, device=device)
    grad = torch.randn(4, 74, 256, generator=gen, device=device).to(torch.bfloat16)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (Triton compiles) outside the capture
            for _ in range(2):
                prompt.grad = None
                fastprompt.prompt_concat(ids, word, prompt, indices).backward(grad)
        torch.cuda.current_stream().wait_stream(side)
        prompt.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fastprompt.prompt_concat(ids, word, prompt, indices)
            out.backward(grad)
        ids.copy_(torch.randint(0, 1000, ids.shape, generator=gen, device=device))
        indices.copy_(torch.randint(0, 16, indices.shape, generator=gen, device=device))
        graph.replay()
        torch.cuda.synchronize()
        replay_out, replay_grad = out.clone(), prompt.grad.clone()
        prompt.grad = None
        eager_out = fastprompt.prompt_concat(ids, word, prompt, indices)
        eager_out.backward(grad)
        same = torch.equal(replay_out, eager_out) and torch.equal(replay_grad, prompt.grad)
        return (
            same,
            f"CUDA graph capture + replay, forward and backward: {'equal to eager' if same else 'DIFFERS'}",
        )
    except Exception as err:  # a host sync during capture raises here
        return False, f"CUDA graph capture: {type(err).__name__}: {err}"


# ------------------------------------------------------------------------------------ check sections
# Each section is a function (device, budget) -> list of (ok, line), run in order after the op's
# correctness, compile and CUDA-graph checks while the budget lasts; its lines go under its title.
# To add one (mixed-prompt batches, prompt-KV reuse, ...): write the function, then append
# (title, function, seconds it needs at least) to SECTIONS. Keep each under ~20 s on an H200.


def _launch_counter(launches: list):
    """Wrap every @triton.jit kernel of fastprompt's kernel modules to record its launches by name;
    returns a function that undoes it."""
    from fastprompt.kernels import prompt_concat_bwd, prompt_concat_fwd

    undo = []
    for module in (prompt_concat_fwd, prompt_concat_bwd):
        for name in [n for n in dir(module) if n.endswith("_kernel")]:
            kernel = getattr(module, name)

            class Counting:
                def __getitem__(self, grid, kernel=kernel, name=name):
                    def launch(*args, **kwargs):
                        launches.append(name)
                        return kernel[grid](*args, **kwargs)

                    return launch

            setattr(module, name, Counting())
            undo.append((module, name, kernel))
    return lambda: [setattr(m, n, k) for m, n, k in undo]


def backward_section(device: torch.device, budget: Budget) -> list[tuple[bool, str]]:
    """The backward kernels: the prompt gradient of prompt_indices=None in ONE launch (no sort), equal
    to float64; a pad id filling the whole batch (no padding_idx) split across programs, equal to
    float64 and bit-identical from run to run; and their times against PyTorch's own reductions."""
    from fastprompt.kernels import batch_rows_sum, segment_rows_sum

    import fastprompt

    lines = []
    gen = torch.Generator(device=device).manual_seed(3)
    batch, num_prompt, seq, dim, vocab = 32, 20, 1024, 4096, 32000
    ids = torch.randint(0, vocab, (batch, seq), generator=gen, device=device)
    word = torch.randn(vocab, dim, generator=gen, device=device).to(torch.bfloat16)
    prompt = torch.randn(num_prompt, dim, generator=gen, device=device).requires_grad_()
    grad = torch.randn(batch, num_prompt + seq, dim, generator=gen, device=device).to(torch.bfloat16)
    launches: list[str] = []
    undo = _launch_counter(launches)
    try:
        out = fastprompt.prompt_concat(ids, word, prompt)
        launches.clear()
        out.backward(grad)
        torch.cuda.synchronize(device)
    finally:
        undo()
    expected = grad[:, :num_prompt].double().sum(0)
    error = (prompt.grad.double() - expected).abs().max().item()
    ok = launches == ["_batch_rows_sum_kernel"] and error < 1e-3
    lines.append(
        (
            ok,
            f"prompt grad, indices=None, B={batch} T={num_prompt} D={dim}: launches {launches}, "
            f"max |error| vs float64 {error:.2e}",
        )
    )
    pad = torch.full((batch, seq), 7, device=device)  # every position the same id: one B*L segment
    sums = [segment_rows_sum(grad, num_prompt, pad, vocab, torch.float32) for _ in range(2)]
    reference = grad[:, num_prompt:].double().sum((0, 1))
    error = (sums[0][7].double() - reference).abs().max().item()
    others_zero = bool((sums[0][:7] == 0).all() and (sums[0][8:] == 0).all())
    same = torch.equal(sums[0], sums[1])
    line = f"word grad, one pad id in all B*L={batch * seq} positions: max |error| vs float64 {error:.2e}, "
    lines.append(
        (error < 1e-1 and others_zero and same, line + f"other rows 0 {others_zero}, same twice {same}")
    )
    if budget.left() > 20:
        token_grads = grad[:, num_prompt:].reshape(-1, dim)
        times = {
            "prompt grad": lambda: batch_rows_sum(grad, num_prompt, torch.float32),
            "torch sum": lambda: grad[:, :num_prompt].sum(0, dtype=torch.float32),
            "word grad, random ids": lambda: segment_rows_sum(grad, num_prompt, ids, vocab, torch.float32),
            "word grad, one pad id": lambda: segment_rows_sum(grad, num_prompt, pad, vocab, torch.float32),
            "torch index_add_ (atomics)": lambda: torch.zeros(vocab, dim, device=device).index_add_(
                0, ids.view(-1), token_grads.float()
            ),
        }
        listed = ", ".join(f"{name} {median_seconds(fn, device) * 1e6:.0f} us" for name, fn in times.items())
        lines.append((True, f"times (do_bench): {listed}"))
    return lines


def mixed_batch_section(device: torch.device, budget: Budget) -> list[tuple[bool, str]]:
    """K=4 adapters x 4 rows on the tiny Llama: the mixed batch equals the per-adapter loop (forward
    logits, greedy tokens); times of loop, mixed and one adapter (batching gains more on a GPU)."""
    from fastprompt.benchmarks import mixed
    from fastprompt.testing.tiny_models import load_base_model

    model = mixed.mixed_model(load_base_model("tiny-llama").to(device))
    batch = len(model.names)
    lines = []
    for label, length, run in (
        ("forward", mixed.FORWARD_LEN, mixed._forward),
        ("generate", mixed.GENERATE_LEN, mixed._greedy),
    ):
        calls = mixed._calls(model, mixed._token_batch(model.model, batch, length, 1), run)
        same = mixed._check(calls, exact=label == "generate")
        lines.append((same, f"mixed {label} equals the per-adapter loop: {same}"))
        with torch.no_grad():
            times = timings_each(calls, device, budget_s=min(1.0, max(0.2, budget.left() / 20)))
        listed = ", ".join(f"{name} {t.median * 1e3:.2f} ms" for name, t in times.items())
        lines.append((True, f"mixed {label} times: {listed}"))
    return lines


def prompt_kv_section(device: torch.device, budget: Budget) -> list[tuple[bool, str]]:
    """Generation with prompt-KV reuse on the tiny Llama, N=100: tokens equal to reuse off; the rows."""
    from fastprompt.benchmarks.prompt_kv import prompt_kv_results

    results = prompt_kv_results(
        "tiny-llama",
        device,
        budget_s=min(0.5, max(0.2, budget.left() / 40)),
        num_virtual_tokens=(100,),
        progress=log,
        providers=("reuse", "no reuse", "no prompt"),
    )
    return [
        (
            r.matches_peft,
            f"{r.workload} {r.provider}: {r.seconds * 1e3:.2f} ms, x{r.speedup or 0:.2f} vs no reuse",
        )
        for r in results
    ]


def shared_prefix_section(device: torch.device, budget: Budget) -> list[tuple[bool, str]]:
    """Training with the shared prompt prefix (issue 15): one step of the 4-layer bench Llama (hidden 256,
    vocabulary 8000) at each (N, L, B) of ``shared_prefix.SHAPES``, PEFT vs fastprompt's default vs
    ``share_prompt_prefix=False``: the first step's loss and prompt gradient equal PEFT's, time and peak
    memory of a step (targets: >= 1.8x PEFT at N=100 L=64 B=8, >= 0.97x everywhere, less memory where
    it shares). Then the same for P-tuning (MLP encoder; target >= 1.7x at N=100 L=64 B=8) and
    multitask prompt tuning at ``shared_prefix.METHOD_SHAPES`` (issue 21)."""
    from fastprompt.benchmarks.shared_prefix import shared_prefix_results

    notes: list[str] = []
    results = shared_prefix_results(
        device,
        budget_s=min(0.5, max(0.2, budget.left() / 60)),
        providers=("peft", "fastprompt", "no share"),
        progress=log,
        notes=notes,
    )
    return _train_step_lines(results, notes)


def _train_step_lines(results: list[Result], notes: list[str]) -> list[tuple[bool, str]]:
    """One line per training-step row (time, speedup and peak against PEFT's row), then the notes."""
    lines = []
    for r in results:
        memory = "" if r.memory_ratio is None else f", peak x{r.memory_ratio:.2f} of peft's"
        lines.append(
            (
                r.matches_peft,
                f"{r.workload} {r.provider}: {r.seconds * 1e3:.2f} ms, x{r.speedup:.2f} vs peft{memory}",
            )
        )
    return lines + [(True, line) for line in notes]


def trl_packed_section(device: torch.device, budget: Budget) -> list[tuple[bool, str]]:
    """Where users train with TRL (issue 20), the bench Llama, N=100: a training step through TRL's fused
    LM head at (N, L, B) = (100, 64, 8), PEFT vs fastprompt with the same head (the first step's loss and
    prompt gradient equal PEFT's; only where TRL is installed); and a packed step of 8 documents of
    16..128 tokens, fastprompt's padding-free row vs PEFT's padded batch and the no-prompt packed floor
    (loss and prompt gradient equal the padded batch's). Times and peak memory (targets, CPU: >= 2.0x
    PEFT's padded batch and <= 1.4x the floor; the fused-head step faster than PEFT's)."""
    from fastprompt.benchmarks import trl_packed

    notes: list[str] = []
    budget_s = min(0.5, max(0.2, budget.left() / 60))
    results = []
    if trl_packed.trl_available():
        results += trl_packed.fused_head_results(device, budget_s=budget_s, progress=log, notes=notes)
    else:
        notes.append("train step TRL fused head: skipped, TRL is not installed")
    results += trl_packed.packed_results(device, budget_s=budget_s, progress=log, notes=notes)
    return _train_step_lines(results, notes)


# Families of the model matrix checked on the GPU in bf16: dense, MoE, sliding window + layer types,
# LongRoPE, attention sinks + MoE, chunked attention.
MATRIX_FAMILIES = ("llama", "qwen3", "qwen3_moe", "gemma3_text", "phi3", "gpt_oss", "llama4_text")


def model_matrix_section(device: torch.device, budget: Budget) -> list[tuple[bool, str]]:
    """The model matrix (issue 27) on the GPU in bf16 for a handful of families (``MATRIX_FAMILIES``, tiny
    configs of ``fastprompt.testing.causal_lms``): a training step shared against PEFT's (loss, logits,
    prompt gradient within bf16 rounding) and packed rows against each document alone through PEFT, with
    the path each took (the prompt once where it shares)."""
    from fastprompt.testing import causal_lms, model_matrix

    lines = []
    for family in MATRIX_FAMILIES:
        if family not in causal_lms.matrix_types() or budget.left() < 20:
            lines.append((True, f"{family}: not run (not in this transformers, or no budget left)"))
            continue
        for path, check in (("train", model_matrix.check_train), ("packed", model_matrix.check_packed)):
            try:
                result = check(family, device=device, dtype=torch.bfloat16)
            except Exception as error:  # a GPU-only failure is a finding: report it, go on
                lines.append((False, f"{family} {path}: {type(error).__name__}: {error}"))
                continue
            expected = model_matrix.EXPECTED_DECLINES.get(family, {}).get(path)
            declined_as_listed = expected is not None and expected in (result.reason or "")
            ok = result.exact and (result.shared or declined_as_listed)
            shared = "shared" if result.shared else f"not shared ({result.reason})"
            lines.append((ok, f"{family} {path} bf16: {shared}; {result.detail}"))
    return lines


def mixed_precision_section(device: torch.device, budget: Budget) -> list[tuple[bool, str]]:
    """One training step of the tiny Llama (B=8, L=256, 20 virtual tokens), PEFT vs fastprompt, under the
    autocast wrapper ``Trainer(bf16=True)`` / ``fp16=True`` sets on ``model.forward``: bf16, and fp16 with
    a GradScaler. Checks that autocast is active inside both base models and the logits agree; times
    both, with the fp32 step for comparison."""
    from fastprompt.benchmarks.models import MixedPrecisionStep, TrainStep, autocast_check
    from fastprompt.testing.tiny_models import load_base_model, prompt_tuned_pair

    base = load_base_model("tiny-llama").to(device)
    models = dict(zip(("peft", "fastprompt"), prompt_tuned_pair(base, 20), strict=True))
    lines = []
    budget_s = min(0.5, max(0.2, budget.left() / 40))
    steps = {"fp32": lambda m: TrainStep(m, 8, 256)}
    for label, dtype in (("bf16", torch.bfloat16), ("fp16 + GradScaler", torch.float16)):
        ok, detail = autocast_check(models, dtype)
        lines.append((ok, f"{label}: {detail}"))
        steps[label] = lambda m, dtype=dtype: MixedPrecisionStep(m, 8, 256, dtype)
    for label, make in steps.items():
        calls = {name: make(model) for name, model in models.items()}
        for call in calls.values():
            call()  # warm-up: AdamW's state, the kernels' first compiles
        times = timings_each(calls, device, budget_s=budget_s)
        peft_ms, fast_ms = (times[name].median * 1e3 for name in ("peft", "fastprompt"))
        lines.append(
            (True, f"train step {label}: peft {peft_ms:.2f} ms, fastprompt {fast_ms:.2f} ms "
                   f"(x{peft_ms / fast_ms:.2f})")
        )  # fmt: skip
    return lines


def serving_section(device: torch.device, budget: Budget) -> list[tuple[bool, str]]:
    """Soft prompts served on vLLM (``fastprompt.vllm``), when vLLM is installed: 32 requests over 4
    adapters (N=100, 12+16 tokens, fp32 Llama D=512 x6, CUDA graphs on), against the same engine with no
    soft prompt (target: within 1.3x) and fastprompt's transformers path on this GPU (target: vLLM at
    least 1.3x faster); whether the tokens agree is reported."""
    from fastprompt.benchmarks.serving import serving_results, vllm_available

    if not vllm_available():
        return [(True, "skipped: vLLM is not installed (pip install 'fastprompt[vllm]')")]
    notes: list[str] = []
    results = serving_results(
        ((512, 6),),
        repeats=5,
        engine={"enforce_eager": False, "gpu_memory_utilization": 0.3},
        device=device,
        progress=log,
        notes=notes,
    )
    lines = [
        (True, f"{r.shape} {r.provider}: {r.seconds * 1e3:.2f} ms, x{r.speedup or 0:.2f} vs transformers")
        for r in results
    ]
    return lines + [(True, line) for line in notes]


SECTIONS = [
    ("Backward kernels", backward_section, 20.0),
    ("Mixed-prompt batches (adapter_names)", mixed_batch_section, 20.0),
    ("Prompt-KV reuse in generate", prompt_kv_section, 20.0),
    ("Mixed precision (autocast) train step", mixed_precision_section, 15.0),
    ("Shared prompt prefix train step", shared_prefix_section, 20.0),
    ("Model matrix in bf16", model_matrix_section, 15.0),
    ("TRL fused head and packed train steps", trl_packed_section, 20.0),
    ("Serving soft prompts on vLLM", serving_section, 60.0),
]


def run_sections(device: torch.device, budget: Budget) -> tuple[list[tuple[bool, str]], list[str]]:
    """Every section of ``SECTIONS`` while the budget lasts: (checks, sections not run)."""
    checks, not_run = [], []
    for title, section, needs_s in SECTIONS:
        if budget.left() < needs_s:
            not_run.append(f"section {title!r} (time budget)")
            continue
        log(f"section: {title}")
        emit(f"\n### {title}\n")
        try:
            lines = section(device, budget)
        except Exception as err:  # a crash is a failed check, with its reason
            lines = [(False, f"{title}: {type(err).__name__}: {err}")]
        for ok, line in lines:
            emit(f"- {'ok' if ok else 'FAIL'}: {line}")
        checks += lines
    return checks, not_run


def wall_seconds_per_call(fn, device: torch.device, calls: int = 2000) -> float:
    """Host wall time per call over ``calls`` back-to-back calls, synchronized at both ends.

    The latency a caller sees: launch overheads and Python included, where ``do_bench`` (which clears
    L2 before each call) can hide a call's host time behind the clearing kernel.
    """
    fn()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def empty_launch(device: torch.device) -> dict[str, float]:
    """One launch of an empty Triton kernel (one program): ``do_bench`` median and wall time per call."""
    x = torch.empty(1, device=device)
    launch = lambda: _empty_kernel[(1,)](x, 1)
    launch()
    return {"do_bench": median_seconds(launch, device), "wall": wall_seconds_per_call(launch, device)}


def is_latency_shape(shape) -> bool:
    """The shape of the latency target: B=1, L=128."""
    return shape.batch == 1 and shape.seq == 128


def rotating_call(name: str, sets: list, backward: bool):
    """A call of provider ``name`` that uses the next input set each time."""
    calls = itertools.cycle([op_call(name, s, backward=backward) for s in sets])
    return lambda: next(calls)()


def big_target_shape():
    """The forward shape of the >= 256 MB targets: the first of ``SUITE_SHAPES["cuda"]`` in a bf16 model
    (PEFT's fp32 prompt) that moves at least 256 MB, else the first that does."""
    big = [s for s in SUITE_SHAPES["cuda"] if bytes_moved(s) >= BIG_BYTES]
    return next((s for s in big if s.word_dtype == torch.bfloat16), big[0])


def plan() -> tuple[list[tuple], list[tuple]]:
    """(priority, rest): the (shape, backward) runs the targets need first, then the others in order."""
    latency = next(s for s in SUITE_SHAPES["cuda"] if is_latency_shape(s))
    priority = [(big_target_shape(), False), (latency, False), (TARGET_SHAPE, False)]
    rest = [(s, b) for b in (False, True) for s in SUITE_SHAPES["cuda"] if (s, b) not in priority]
    return priority, rest


def time_shape(
    device: torch.device,
    shape,
    backward: bool,
    copy_gbps: float,
    providers: tuple[str, ...],
    latency: dict[str, float],
) -> list[Result]:
    """Time ``providers`` on one shape (forward, or forward+backward); the latency shape's forward also
    fills ``latency`` with each provider's wall time per call."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * 2**20)
    nbytes = bytes_moved(shape)
    num_sets = max(2, min(8, math.ceil(4 * l2 / nbytes)))
    workload = "forward+backward" if backward else "forward"
    sets = [make_inputs(shape, device, backward=backward, seed=i) for i in range(num_sets)]
    results = []
    try:
        for name in providers:
            log(f"{workload} {shape.title}: {name} ({num_sets} input sets)")
            call = rotating_call(name, sets, backward)
            call()  # compiles, autotunes
            peak = peak_extra_bytes(call, device)
            timing = timings_each({name: call}, device, budget_s=0.3)[name]
            moved = bytes_moved(shape, backward=backward)
            results.append(
                Result(
                    workload, shape.title, name, timing.median, moved, peak, copy_gbps, spread=timing.spread
                )
            )
            if is_latency_shape(shape) and not backward:
                latency[name] = wall_seconds_per_call(call, device)
    finally:
        del sets
        torch.cuda.empty_cache()
    return results


def time_runs(
    device: torch.device, runs: list[tuple], copy_gbps: float, budget: Budget, results: list, latency: dict
) -> list[str]:
    """Time each (shape, backward) of ``runs`` while the budget lasts, appending to ``results``;
    ``compile`` only while ``COMPILE_RESERVE_S`` are left. Returns what was skipped, one line each."""
    skipped = []
    for shape, backward in runs:
        workload = "forward+backward" if backward else "forward"
        if budget.left() <= 0:
            skipped.append(f"{workload} {shape.title}: not timed (time budget)")
            continue
        providers = PROVIDERS
        if budget.left() < COMPILE_RESERVE_S:
            providers = tuple(p for p in PROVIDERS if p != "compile")
            skipped.append(f"{workload} {shape.title}: compile not timed (time budget)")
        results += time_shape(device, shape, backward, copy_gbps, providers, latency)
    return skipped


def targets(results: list[Result], empty: dict[str, float], latency: dict[str, float]) -> list[str]:
    """Where each GPU target stands, one line each."""
    lines = []
    forward = [r for r in results if r.workload == "forward"]
    for r in forward:
        if r.provider != "fastprompt":
            continue
        same = {x.provider: x for x in forward if x.shape == r.shape}
        notes = []
        if r.bytes_moved >= BIG_BYTES:
            ok = r.copy_fraction >= 0.9
            notes.append(f"{r.copy_fraction:.0%} of copy bandwidth ({'met' if ok else 'MISSED'}: >= 90%)")
        ok = r.speedup >= 2.0
        notes.append(f"{r.speedup:.2f}x peft ({'met' if ok else 'MISSED'}: >= 2x)")
        if "compile" in same:
            ratio = same["compile"].seconds / r.seconds
            notes.append(f"{ratio:.2f}x compile ({'met' if ratio >= 1.0 else 'MISSED'}: >= 1x)")
        if "fastprompt" in latency and r.shape.startswith("B=1 ") and " L=128 " in r.shape:
            ratio = latency["fastprompt"] / empty["wall"]
            others = ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in latency.items() if k != "fastprompt")
            notes.append(
                f"{latency['fastprompt'] * 1e6:.1f} us per call back to back = {ratio:.2f}x an empty Triton "
                f"launch ({empty['wall'] * 1e6:.1f} us) ({'met' if ratio <= 1.5 else 'MISSED'}: <= 1.5x; "
                f"{others}); do_bench: {r.seconds * 1e6:.1f} us vs {empty['do_bench'] * 1e6:.1f} us"
            )
        lines.append(f"- forward {r.shape}: " + "; ".join(notes))
    return lines


def _on_alarm(signum, frame):
    raise OutOfTime


def main(argv: list[str] | None = None) -> int:
    """Run the whole check; print markdown on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget",
        type=float,
        default=190.0,
        help="seconds of work (from start-up) after which optional work is skipped; a hard stop "
        f"{HARD_STOP_AFTER_S:.0f} s later (default 190)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="import everything, print the plan and the sections, run nothing",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        priority, rest = plan()
        emit("gpu_check plan (dry run):")
        for shape, backward in priority + rest:
            emit(f"- time {'forward+backward' if backward else 'forward'} {shape.title}")
        emit("- correctness, torch.compile fullgraph, CUDA graph capture")
        for title, section, needs_s in SECTIONS:
            emit(f"- section {title!r} ({section.__name__}, needs {needs_s:.0f} s)")
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, nothing to check (run it on a machine with an NVIDIA GPU).")
        return 0
    if triton is None:
        print("gpu_check: triton is not installed; fastprompt's GPU kernels need it.")
        return 1
    import fastprompt

    budget = Budget(args.budget)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(max(1, math.ceil(budget.left() + HARD_STOP_AFTER_S)))
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    backend = fastprompt.backend_for(device)
    emit(f"## GPU check: {name}\n")
    emit(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"triton {triton.__version__}, fastprompt {fastprompt.__version__} (backend {backend}); "
        f"budget {args.budget:.0f} s\n"
    )
    checks: list[tuple[bool, str]] = []
    not_run: list[str] = []
    results: list[Result] = []
    latency: dict[str, float] = {}
    empty = {"wall": math.nan, "do_bench": math.nan}
    copy_gbps = math.nan
    stopped = False
    try:
        log("device-to-device copy bandwidth, empty Triton launch")
        copy_gbps = copy_bandwidth(device, budget_s=0.3)
        empty = empty_launch(device)
        emit(
            f"Device-to-device copy of 1 GiB: {copy_gbps:.0f} GB/s. Empty Triton kernel: "
            f"{empty['wall'] * 1e6:.1f} us per launch back to back, "
            f"{empty['do_bench'] * 1e6:.1f} us by do_bench.\n"
        )
        priority, rest = plan()
        log("target timings: the >= 256 MB forward, the B=1 L=128 forward, the CPU target shape")
        for shape, backward in priority:  # all providers, whatever the budget says
            results += time_shape(device, shape, backward, copy_gbps, PROVIDERS, latency)
        log("correctness: every dtype pair and index mode, one small shape each")
        emit("### Correctness\n")
        op_checks, skipped = correctness(device, budget)
        checks += op_checks
        not_run += [f"op {label}" for label in skipped]
        log("torch.compile fullgraph")
        fullgraph = compile_fullgraph(device, budget)
        checks += fullgraph
        checks.append(cuda_graph_capture(device))
        emit(f"- {'ok' if checks[-1][0] else 'FAIL'}: {checks[-1][1]}")
        not_run += [f"compile fullgraph ({3 - len(fullgraph)} index modes)"] if len(fullgraph) < 3 else []
        section_checks, sections_not_run = run_sections(device, budget)
        checks += section_checks
        not_run += sections_not_run
        log("the other shapes, while the budget lasts")
        not_run += time_runs(device, rest, copy_gbps, budget, results, latency)
    except OutOfTime:
        stopped = True
        log("hard stop: out of time")
    finally:
        signal.alarm(0)
    if stopped:
        emit(f"\n**Stopped at the hard deadline ({args.budget + HARD_STOP_AFTER_S:.0f} s); results so far.**")
    results = with_speedups(results)
    emit("\n### Timings (triton.testing.do_bench, median; rotating input sets)\n")
    emit(text_table(results, markdown=True))
    emit("\n### Targets\n")
    emit("\n".join(targets(results, empty, latency)))
    if not_run:
        emit("\n### Not run (time budget)\n")
        emit("\n".join(f"- {line}" for line in not_run))
    log("done")
    failed = sum(not ok for ok, _ in checks)
    summary = f"{len(checks) - failed} correctness checks passed, {failed} failed"
    emit(f"\n{summary}, {len(not_run)} items not run.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
