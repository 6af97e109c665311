"""Set-up of the pytest-benchmark suite (``pytest bench --benchmark-only``).

- ``TRITON_INTERPRET`` is removed before fastprompt is imported: the interpreter runs every program
  instance in Python and would time Python, not the op. On CPU fastprompt then runs its torch path; on
  CUDA the compiled Triton kernels. ``FASTPROMPT_BACKEND`` is left as the caller set it (unset: auto).
  In the combined run of README's test command (``pytest tests bench``, benchmarks skipped by
  ``--benchmark-skip`` in pyproject's ``addopts``) ``tests/conftest.py`` has already imported
  fastprompt under the interpreter; then the environment is left as it is.
- On CPU, glibc keeps freed memory in the process (``keep_freed_memory``, when benchmarks run):
  otherwise page faults on fresh outputs dominate and make the times vary tenfold on a virtual machine.
  The conservative choice for fastprompt (PEFT's extra buffer then costs no faults);
  ``FASTPROMPT_BENCH_ALLOCATOR=default`` measures glibc as it comes.
- ``device``: CUDA when present, else CPU; the shape set follows it (``SUITE_SHAPES``).
- ``measure``: ``measure(fn)`` times ``fn`` with pytest-benchmark; on CUDA every timed call ends with
  ``torch.cuda.synchronize()``, so a round times the work and not just its asynchronous launch.
- ``record``: what every result carries in its ``extra_info`` (bytes that must move, GB/s, peak memory;
  on CUDA also a ``triton.testing.do_bench`` median, L2 cleared before each call, and the fraction of a
  measured device-to-device copy's bandwidth it reaches, the copy being timed by ``do_bench`` too).
"""

from __future__ import annotations

import functools
import os
import sys

if "fastprompt" not in sys.modules:  # alone (``pytest bench``): the compiled kernels or the torch path
    os.environ.pop("TRITON_INTERPRET", None)

import pytest  # noqa: E402
import torch  # noqa: E402

from fastprompt.benchmarks import (  # noqa: E402
    bench_device,
    copy_bandwidth,
    gbps,
    keep_freed_memory,
    median_seconds,
    synchronize,
)


@functools.cache
def keeps_freed_memory() -> bool:
    """Apply ``keep_freed_memory`` once, when the first benchmark runs (CPU, unless opted out)."""
    return (
        bench_device().type == "cpu"
        and os.environ.get("FASTPROMPT_BENCH_ALLOCATOR", "keep") != "default"
        and keep_freed_memory()
    )


MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated above the level before the call",
    "cpu": "torch.profiler(profile_memory=True): CPU allocator alloc/free events summed in time order",
}


def pytest_configure(config):
    """Silence a deprecation torch.compile's own internals raise (not ours to fix); when benchmarks run
    (not skipped by ``--benchmark-skip``), set up the CPU allocator before anything is measured."""
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
    )
    skipped = config.getoption("benchmark_skip", False) and not config.getoption("benchmark_only", False)
    if not skipped:
        keeps_freed_memory()


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device under test."""
    return bench_device()


@pytest.fixture(scope="session")
def copy_gbps(device) -> float | None:
    """GB/s of a 1 GiB device-to-device copy on CUDA (None on CPU: no ceiling is claimed there)."""
    if device.type != "cuda":
        return None
    return copy_bandwidth(device)


def synchronized(fn, device: torch.device):
    """``fn`` itself on CPU; on CUDA ``fn`` followed by a device synchronize, so its time is the work's."""
    if device.type != "cuda":
        return fn

    def call():
        result = fn()
        synchronize(device)
        return result

    return call


@pytest.fixture
def measure(benchmark, device):
    """``measure(fn)``: ``benchmark(fn)``, each timed call synchronized with the device on CUDA."""

    def run(fn):
        synchronize(device)
        return benchmark(synchronized(fn, device))

    return run


@pytest.fixture
def record(benchmark, device, copy_gbps):
    """``record(nbytes=..., peak=..., call=...)``: fill the result's extra_info after ``measure(...)`` ran.

    On CUDA, with ``call`` given, also a ``do_bench`` median of it (the method the copy bandwidth is
    measured with): ``fraction_of_copy`` comes from that median, like for like.
    """

    def fill(*, nbytes: int | None = None, peak: int | None = None, call=None, **more) -> None:
        info = benchmark.extra_info
        info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        info["peak_extra_bytes"] = peak
        info["peak_memory_method"] = MEMORY_METHOD[device.type]
        if device.type == "cpu":
            info["threads"] = torch.get_num_threads()
            info["allocator"] = "glibc keeps freed memory" if keeps_freed_memory() else "default"
        info.update(more)
        stats = getattr(benchmark, "stats", None)
        median = stats.stats.median if stats is not None else None
        if device.type == "cuda":
            info["timing"] = "pytest-benchmark rounds, each ending with torch.cuda.synchronize()"
        if nbytes is not None:
            info["bytes_moved"] = nbytes
            if median:
                info["GB/s"] = round(gbps(nbytes, median), 2)
            if call is not None and device.type == "cuda":
                seconds = median_seconds(call, device, budget_s=0.2)
                info["do_bench_median_s"] = seconds
                info["do_bench_GB/s"] = round(gbps(nbytes, seconds), 2)
                if copy_gbps:
                    info["copy_GB/s"] = round(copy_gbps, 1)
                    info["fraction_of_copy"] = round(gbps(nbytes, seconds) / copy_gbps, 3)

    return fill
