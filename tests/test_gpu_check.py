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
