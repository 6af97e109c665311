"""Shared test set-up.

The Triton kernels run here through Triton's interpreter: TRITON_INTERPRET=1 must be set before the
module that defines them is imported, so it is set at the top of this file. Tests run on the
pure-PyTorch path by default (FASTPROMPT_BACKEND=torch); the ``backend`` fixture switches a test to
the interpreted Triton kernels as well. Tolerances, the float64 reference and the tiny models are in
``fastprompt.testing`` (shared with ``python -m fastprompt check`` and the benchmarks).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTPROMPT_BACKEND", "torch")

import pytest  # noqa: E402

from fastprompt.ops.backend import triton_available  # noqa: E402

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test once on the torch path and once on the Triton kernels (interpreter on CPU)."""
    if request.param == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("FASTPROMPT_BACKEND", request.param)
    return request.param
