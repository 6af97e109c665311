"""The GPU check of issue 4: one prepared script, ``python bench/gpu_check.py`` on a CUDA machine.

1. Correctness of ``prompt_concat`` (Triton kernels) for every dtype pair and index mode against a
   float64 reference, and against PEFT's path (``fastprompt.parity.op_parity``).
2. ``torch.compile(fullgraph=True)`` of a function calling ``prompt_concat``: forward and backward equal
   to eager, for each index mode.
3. The bandwidth of a 1 GiB device-to-device copy: the ceiling a gather can reach.
4. ``peft`` / ``compile`` / ``fastprompt`` timed with ``triton.testing.do_bench`` (median), forward and
   forward+backward, on several input sets used in turn (``do_bench`` also clears L2 between calls),
   over ``SUITE_SHAPES["cuda"]``; and one bare launch of an empty Triton kernel. At B=1, L=128 also
   the wall time per call over back-to-back calls (the latency a caller sees, launches included).
5. The targets: forward >= 90% of the copy's bandwidth where >= 256 MB must move; >= 2x ``peft`` and
   not slower than ``compile``; at B=1, L=128 a call within 1.5x of the empty kernel's launch.

Prints markdown (paste it into bench/RESULTS.md). Exit code 1 if a correctness check fails; the
targets are reported, not enforced. Written for torch >= 2.4 / triton >= 3.0 (the GPU image has
torch 2.11, triton 3.6, transformers 5.17). Without CUDA it says so and exits 0. It keeps to a time
budget (``--budget``, default 210 s): compiled providers of the shapes left when it runs out are skipped.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the compiled kernels, never the interpreter

import torch  # noqa: E402

from fastprompt.benchmarking import (  # noqa: E402
    PROVIDERS,
    SUITE_SHAPES,
    bytes_moved,
    copy_bandwidth,
    make_inputs,
    median_seconds,
    op_call,
    peak_extra_bytes,
)
from fastprompt.report import Result, text_table, with_speedups  # noqa: E402

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


def log(message: str) -> None:
    """Progress on stderr, with the seconds elapsed."""
    print(f"[gpu_check {time.perf_counter() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


def correctness(device: torch.device) -> list[tuple[bool, str]]:
    """Every dtype pair and index mode against float64 (and PEFT's path where it applies)."""
    from fastprompt.parity import op_parity

    return [(c.ok, c.line) for c in op_parity(device)]


def compile_fullgraph(device: torch.device) -> list[tuple[bool, str]]:
    """``torch.compile(fullgraph=True)`` of prompt_concat: forward and prompt gradient equal to eager."""
    import fastprompt

    def fn(ids, word, prompt, indices):
        return fastprompt.prompt_concat(ids, word, prompt, indices) * 1.0

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    gen = torch.Generator(device=device).manual_seed(0)
    lines = []
    for mode in ("all", "shared", "per-batch"):
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
    return lines


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


def time_providers(
    device: torch.device, copy_gbps: float, budget_s: float
) -> tuple[list[Result], dict[str, float]]:
    """Every shape, forward and forward+backward, every provider (compile skipped when out of time).

    Returns the results and, for the latency shape's forward, each provider's wall time per call.
    """
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * 2**20)
    results = []
    latency = {}
    for shape in SUITE_SHAPES["cuda"]:
        nbytes = bytes_moved(shape)
        num_sets = max(2, min(8, math.ceil(4 * l2 / nbytes)))
        for backward in (False, True):
            workload = "forward+backward" if backward else "forward"
            sets = [make_inputs(shape, device, backward=backward, seed=i) for i in range(num_sets)]
            for name in PROVIDERS:
                if name == "compile" and time.perf_counter() - START > budget_s:
                    log(f"{workload} {shape.title}: compile skipped (time budget spent)")
                    continue
                log(f"{workload} {shape.title}: {name} ({num_sets} input sets)")
                call = rotating_call(name, sets, backward)
                call()  # compiles, autotunes
                peak = peak_extra_bytes(call, device)
                seconds = median_seconds(call, device)
                moved = bytes_moved(shape, backward=backward)
                results.append(Result(workload, shape.title, name, seconds, moved, peak, copy_gbps))
                if is_latency_shape(shape) and not backward:
                    latency[name] = wall_seconds_per_call(call, device)
            del sets
            torch.cuda.empty_cache()
    return with_speedups(results), latency


def targets(results: list[Result], empty: dict[str, float], latency: dict[str, float]) -> list[str]:
    """Where each GPU target of issue 4 stands, one line each."""
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


def main(argv: list[str] | None = None) -> int:
    """Run the whole check; print markdown on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=210.0, help="seconds before compile is skipped")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, nothing to check (run it on a machine with an NVIDIA GPU).")
        return 0
    import fastprompt

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    backend = fastprompt.backend_for(device)
    triton_version = triton.__version__ if triton is not None else "missing"
    print(f"## GPU check: {name}\n")
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"triton {triton_version}, fastprompt {fastprompt.__version__} (backend {backend})\n"
    )
    log("correctness: every dtype pair and index mode")
    checks = correctness(device)
    log("torch.compile fullgraph")
    checks += compile_fullgraph(device)
    print("### Correctness\n")
    for ok, line in checks:
        print(f"- {'ok' if ok else 'FAIL'}: {line}")
    log("device-to-device copy bandwidth")
    copy_gbps = copy_bandwidth(device)
    empty = empty_launch(device)
    print(
        f"\nDevice-to-device copy of 1 GiB: {copy_gbps:.0f} GB/s. Empty Triton kernel: "
        f"{empty['wall'] * 1e6:.1f} us per launch back to back, "
        f"{empty['do_bench'] * 1e6:.1f} us by do_bench.\n"
    )
    results, latency = time_providers(device, copy_gbps, args.budget)
    print("### Timings (triton.testing.do_bench, median; rotating input sets)\n")
    print(text_table(results, markdown=True))
    print("\n### Targets\n")
    print("\n".join(targets(results, empty, latency)))
    log("done")
    failed = sum(not ok for ok, _ in checks)
    print(f"\n{len(checks) - failed} correctness checks passed, {failed} failed.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
