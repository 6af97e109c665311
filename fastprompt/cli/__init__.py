"""The command line layer: ``python -m fastprompt bench | check | demo`` and what it needs.

``main`` parses the arguments; ``bench_grid`` runs the benchmark grid, ``parity`` the checks, ``demo`` a
short training run; ``benchmarking`` (providers, shapes, bytes, timing, memory), ``report`` (table,
JSON, plot), ``tiny_models`` (built-in tiny models from configs) and ``model_bench`` (training step,
generation) are shared with the pytest-benchmark suite in ``bench/``.
"""

from .main import main

__all__ = ["main"]
