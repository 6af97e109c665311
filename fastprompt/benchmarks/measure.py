"""How the benchmarks measure: time, peak memory, a copy's bandwidth.

- ``peak_extra_bytes``: the peak of memory allocated during one call above what was allocated before
  it (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the allocator's own alloc/free events recorded by
  ``torch.profiler(profile_memory=True)``, summed in time order).
- ``median_seconds``: the median time of one call (``triton.testing.do_bench`` on CUDA, a timed loop
  on CPU); ``timings_each``: several calls timed side by side, each with its median and interquartile
  range (the spread that says whether a run's ratios can be trusted); ``copy_bandwidth``: a
  device-to-device copy's GB/s, the ceiling for a gather.
- ``keep_freed_memory``: glibc keeps freed memory in the process (steady CPU timings).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence C-level stderr (the profiler's kineto start/stop lines) while the block runs."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak of bytes allocated on the CPU during ``fn()`` above the level before it.

    ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of PyTorch's CPU
    allocator (sizes, +/-); summing them in time order gives the live bytes at each moment. What
    ``fn`` returns is dropped inside the profiled region, so a result counts while it is alive.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        extra = getattr(node, "extra_fields", None)
        if type(extra).__name__.startswith("_ExtraFields_Allocation") and str(extra.device).startswith("cpu"):
            events.append((node.start_time_ns, extra.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        live += size
        peak = max(peak, live)
    return peak


def peak_extra_bytes(
    fn: Callable[[], object], device: torch.device | str, *, warmup: bool = True
) -> int | None:
    """Peak memory one call of ``fn`` allocates above what was allocated before it, or None if unknown.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the allocator's
    events (see ``_cpu_peak_extra_bytes``). With ``warmup`` (the default) ``fn`` is called once first,
    unmeasured, so one-time set-up (compilation, autotuning, an optimizer's state on its first step,
    lazily built buffers) is not counted: the figure is a steady-state call's.
    """
    device = torch.device(device)
    if warmup:
        result = fn()
        del result
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        del result
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type == "cpu":
        try:
            return _cpu_peak_extra_bytes(fn)
        except Exception:  # the profiler API is private: a torch without it gives "unknown", not a crash
            return None
    return None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of returning it to the OS (CPU timing).

    PyTorch's CPU allocator takes every buffer from ``malloc``; glibc serves buffers of megabytes by
    ``mmap`` and gives them back on free, so each call of an op would fault in its output's pages
    again. On a virtual machine those faults dominate the time and vary tenfold from call to call.
    Raising ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to 1 GiB keeps the pages, as PyTorch's CUDA
    caching allocator does on GPU. It is the conservative choice for fastprompt: PEFT's extra
    [B, L, D] buffer then costs its bandwidth but no page faults. Returns False where it cannot apply
    (no glibc).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device | str, *, budget_s: float = 0.5) -> float:
    """The median time of one call of ``fn``, spending about ``budget_s`` seconds measuring.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls), median. Elsewhere: a
    warm-up call, then calls timed one by one until the budget is spent (at least 7).
    """
    return timings_each({"fn": fn}, device, budget_s=budget_s)["fn"].median


@dataclass(frozen=True)
class Timing:
    """The times of one call: median and interquartile range (seconds), and how many calls were timed."""

    median: float
    q1: float
    q3: float
    samples: int

    @property
    def spread(self) -> float:
        """Interquartile range over the median: 0.05 is a steady measurement, 0.25 or more a noisy one."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _do_bench_timing(fn: Callable[[], object], budget_s: float) -> Timing:
    """``triton.testing.do_bench`` (CUDA events, L2 cleared before each call): its quartiles."""
    from triton.testing import do_bench

    warmup, rep = max(1, int(budget_s * 250)), max(1, int(budget_s * 750))
    q1, median, q3 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.25, 0.5, 0.75])
    return Timing(median / 1e3, q1 / 1e3, q3 / 1e3, 0)


def timings_each(
    calls: dict[str, Callable[[], object]], device: torch.device | str, *, budget_s: float = 0.5
) -> dict[str, Timing]:
    """Several calls timed side by side, about ``budget_s`` seconds each: median and quartiles of each.

    On CPU the calls take turns, one call of each per round, the order rotated from round to round
    (none always runs right after the same one): load from elsewhere then slows them all alike, and
    their ratios hold even where the absolute times drift. The spread (``Timing.spread``) says when
    they do not: a busy machine descheduling the process mid-call shows as a wide interquartile range.
    On CUDA each is timed by ``do_bench`` in turn.
    """
    if torch.device(device).type == "cuda":
        return {name: _do_bench_timing(fn, budget_s) for name, fn in calls.items()}
    names = list(calls)
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    deadline = time.perf_counter() + budget_s * len(calls)
    rounds = 0
    while rounds < 7 or (time.perf_counter() < deadline and rounds < 10_000):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            fn = calls[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        rounds += 1
    out = {}
    for name, values in times.items():
        q1, median, q3 = _quartiles(values)
        out[name] = Timing(median, q1, q3, len(values))
    return out


def median_seconds_each(
    calls: dict[str, Callable[[], object]], device: torch.device | str, *, budget_s: float = 0.5
) -> dict[str, float]:
    """The medians of ``timings_each``: several calls, about ``budget_s`` each, measured side by side."""
    return {name: t.median for name, t in timings_each(calls, device, budget_s=budget_s).items()}


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, *, budget_s: float = 0.5) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (read once, written once: 2 * nbytes moved)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, budget_s=budget_s)
    return 2 * nbytes / seconds / 1e9


def gbps(nbytes: int, seconds: float) -> float:
    """Throughput in GB/s (1e9 bytes per second)."""
    return nbytes / seconds / 1e9
