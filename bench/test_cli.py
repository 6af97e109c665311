"""Smoke tests of ``python -m fastprompt bench | check | demo`` (run by ``pytest bench``; skipped by
``--benchmark-only``, which keeps only the benchmarks)."""

from __future__ import annotations

import json

import pytest
import torch

from fastprompt.benchmarks.report import Result, noise_warnings
from fastprompt.cli import main


def test_bench_writes_table_and_json(tmp_path, capsys):
    """A one-shape-set grid without compile: every row checked against peft, a table and a JSON."""
    path = tmp_path / "bench.json"
    argv = ["bench", "--no-model", "--providers", "peft,fastprompt", "--budget", "0.01", "--json", str(path)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "B=8 T=20 L=512 D=1024 fp32" in table and "fastprompt" in table and "IQR/med" in table
    data = json.loads(path.read_text())
    assert {r["provider"] for r in data["results"]} == {"peft", "fastprompt"}
    assert all(r["matches_peft"] and r["peak_bytes"] for r in data["results"])
    assert all(r["spread"] is not None and r["spread"] >= 0 for r in data["results"])


def test_bench_rejects_unknown_provider(capsys):
    """A provider that does not exist is a usage error, before anything runs."""
    assert main(["bench", "--providers", "peft,nope"]) == 2
    assert "--providers" in capsys.readouterr().err


def test_check_op_parity_passes(capsys):
    """Every dtype pair and index mode of the op agrees with the float64 reference on this device."""
    assert main(["check", "--op-only"]) == 0
    out = capsys.readouterr().out
    assert "36 passed, 0 failed" in out


def test_demo_loss_goes_down(capsys):
    """A few prompt-tuning steps lower the loss."""
    assert main(["demo", "--steps", "5"]) == 0
    assert "loss" in capsys.readouterr().out


def test_bench_bad_arguments_are_one_line_usage_errors(capsys):
    """A device torch does not know, a CUDA device on a machine without one, a model that cannot be
    loaded: one error line naming the argument and what is expected, exit code 2, no traceback."""
    bad = [["--device", "nope"], ["--model", "/nonexistent/model"]]
    if not torch.cuda.is_available():
        bad.append(["--device", "cuda"])
    for args in bad:
        assert main(["bench", "--no-model", *args]) == 2, args
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and args[1] in errors[0], err
        assert "expected" in errors[0] or "use --device cpu" in errors[0], err
        assert "Traceback" not in err


def test_bench_rejects_non_positive_budget(capsys):
    """--budget must be above zero: argparse's usage error, exit code 2."""
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--budget", "-1"])
    assert exc.value.code == 2
    assert "--budget" in capsys.readouterr().err


def test_noise_warnings_flag_wide_spread_and_inconsistent_rows():
    """A row whose IQR exceeds 25% of its median, or peft forward+backward faster than its forward,
    makes the table's warning; a steady run makes none."""
    shape = "B=8 T=20 L=512 D=1024 fp32"
    steady = [
        Result("forward", shape, "peft", 2e-3, spread=0.05),
        Result("forward+backward", shape, "peft", 3e-3, spread=0.05),
    ]
    assert noise_warnings(steady) == []
    noisy = [
        Result("forward", shape, "peft", 2e-3, spread=0.6),
        Result("forward+backward", shape, "peft", 1e-3, spread=0.05),
    ]
    lines = noise_warnings(noisy)
    assert len(lines) == 2 and "60%" in lines[0] and "faster than peft forward" in lines[1]
