"""bench/kernel_report.py: the kernels compile for a GPU target here, without a GPU (a fast subset)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPORT = Path(__file__).resolve().parents[1] / "bench" / "kernel_report.py"


def test_quick_report_compiles_every_variant_for_sm_90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTPROMPT_BACKEND")}
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(REPORT), "--arch", "sm_90", "--quick", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = json.loads(out.read_text())
    for key in ("kernel", "variant", "arch", "compiled", "error", "spills", "ld_bits", "st_bits"):
        assert all(key in r for r in records), key
    kernels = {r["kernel"] for r in records}
    expected = {"_prompt_concat_fwd_kernel", "_batch_rows_sum_kernel", "_segment_chunk_kernel"}
    assert expected | {"_segment_finish_kernel"} <= kernels
    assert all(r["compiled"] and r["error"] is None and r["spills"] == 0 for r in records)
    forward = [r for r in records if r["kernel"] == "_prompt_concat_fwd_kernel"]
    assert forward and all(r["ld_bits"] == 128 and r["st_bits"] == 128 for r in forward)  # vectorized rows
    assert "FAILED" not in done.stdout and "compiled variants: 0 failed, 0 spill" in done.stdout


def test_report_plans_come_from_the_launchers(monkeypatch):
    from fastprompt.ops.backend import load_kernels

    load_kernels()  # defined (interpreted) before the report's import sets TRITON_INTERPRET=0
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored after the test
    sys.path.insert(0, str(REPORT.parent))
    try:
        report = importlib.import_module("kernel_report")
    finally:
        sys.path.remove(str(REPORT.parent))
    from fastprompt.kernels import prompt_concat_bwd, prompt_concat_fwd

    from fastprompt.cli.benchmarking import TARGET_SHAPE

    monkeypatch.setattr(prompt_concat_fwd, "forward_blocks", lambda dim, interpret: (1, 64, 2))
    monkeypatch.setattr(prompt_concat_bwd, "backward_blocks", lambda dim, interpret: (32, 1))
    ((_, launch),) = report.forward_launches(TARGET_SHAPE, "bf16", "fp32", "shared", "tensor")
    assert (launch.meta["BLOCK_R"], launch.meta["BLOCK_D"], launch.meta["num_warps"]) == (1, 64, 2)
    assert launch.meta["PROMPT_MODE"] == prompt_concat_fwd.PROMPT_SHARED and launch.meta["SCALE_MODE"] == 2
    backward = report.backward_launches(TARGET_SHAPE, "fp32", "fp32", "all", "none")
    assert [launch.name for _, launch in backward] == [
        "_batch_rows_sum_kernel",
        "_segment_chunk_kernel",
        "_segment_finish_kernel",
    ]
    assert all(launch.meta["BLOCK_D"] == 32 for _, launch in backward)
