"""The command line layer: ``python -m fastprompt bench | check | demo | serve``.

``main`` parses the arguments and runs the commands: ``bench`` through ``fastprompt.benchmarks.grid``,
``check`` through ``fastprompt.testing.parity``, ``demo`` (``demo.py``) a short training run.
"""

from .main import main

__all__ = ["main"]
