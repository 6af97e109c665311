"""bench/gpu_check.py imports and plans here (no GPU): its dry run lists every timing and section."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_dry_run_lists_the_plan_and_every_section():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "time forward B=" in done.stdout and "time forward+backward B=" in done.stdout
    assert "section 'Backward kernels' (backward_section" in done.stdout
    assert "(mixed_precision_section, needs" in done.stdout
    assert "section 'Serving soft prompts on vLLM' (serving_section" in done.stdout
    assert "(shared_prefix_section, needs" in done.stdout
    assert "(trl_packed_section, needs" in done.stdout


def test_model_matrix_section_runs_in_bf16_here(monkeypatch):
    """The GPU check's model-matrix section, on the CPU for one family: the bf16 checks run and pass."""
    import importlib.util

    import torch

    assert (
        "(model_matrix_section, needs"
        in subprocess.run(
            [sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=300
        ).stdout
    )
    import os

    # the script drops TRITON_INTERPRET from the environment: this test's teardown puts it back
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check, "MATRIX_FAMILIES", ("qwen3",))
    lines = gpu_check.model_matrix_section(torch.device("cpu"), gpu_check.Budget(120.0))
    assert len(lines) == 2 and all(ok for ok, _ in lines), lines
    assert all("bf16: shared" in line for _, line in lines), lines
