"""The benchmark machinery shared by ``python -m fastprompt bench``, ``pytest bench`` and ``bench/*.py``.

- ``shapes``: ``Shape`` (one op-level problem), ``bytes_moved``, the shape sets by device kind.
- ``providers``: ``peft`` / ``compile`` / ``fastprompt`` with one signature, their inputs, the check of
  each against ``peft``.
- ``measure``: time (``timings_each``, ``median_seconds``), peak memory (``peak_extra_bytes``), a copy's
  bandwidth, ``keep_freed_memory`` for steady CPU timings.
- ``models``: model-level workloads (``TrainStep``, ``greedy_generate``), PEFT's generation policy on
  transformers >= 5.24, lengths fitted to a model's positions.
- ``report``: ``Result`` rows, speedups, noise warnings, the text table, JSON and plot.
- ``mixed``: mixed-adapter batches (``adapter_names=[...]``) against a loop over adapters and one adapter.
- ``grid``: the compact grid that ``python -m fastprompt bench`` prints.

It uses the library and ``fastprompt.testing`` (tiny models, PEFT's reference path), never the command
line.
"""

from .measure import (
    Timing,
    copy_bandwidth,
    gbps,
    keep_freed_memory,
    median_seconds,
    median_seconds_each,
    peak_extra_bytes,
    synchronize,
    timings_each,
)
from .providers import PROVIDERS, OpInputs, assert_matches_peft, make_inputs, op_call, provider_fn
from .shapes import QUICK_SHAPES, SUITE_SHAPES, TARGET_SHAPE, Shape, bench_device, bytes_moved, device_kind

__all__ = [
    "PROVIDERS",
    "QUICK_SHAPES",
    "SUITE_SHAPES",
    "TARGET_SHAPE",
    "OpInputs",
    "Shape",
    "Timing",
    "assert_matches_peft",
    "bench_device",
    "bytes_moved",
    "copy_bandwidth",
    "device_kind",
    "gbps",
    "keep_freed_memory",
    "make_inputs",
    "median_seconds",
    "median_seconds_each",
    "op_call",
    "peak_extra_bytes",
    "provider_fn",
    "synchronize",
    "timings_each",
]
