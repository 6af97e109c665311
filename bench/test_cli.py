"""Smoke tests of ``python -m fastprompt bench | check | demo`` (run by ``pytest bench``; skipped by
``--benchmark-only``, which keeps only the benchmarks)."""

from __future__ import annotations

import json

from fastprompt.cli import main


def test_bench_writes_table_and_json(tmp_path, capsys):
    """A one-shape-set grid without compile: every row checked against peft, a table and a JSON."""
    path = tmp_path / "bench.json"
    argv = ["bench", "--no-model", "--providers", "peft,fastprompt", "--budget", "0.01", "--json", str(path)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "B=8 T=20 L=512 D=1024 fp32" in table and "fastprompt" in table
    data = json.loads(path.read_text())
    assert {r["provider"] for r in data["results"]} == {"peft", "fastprompt"}
    assert all(r["matches_peft"] and r["peak_bytes"] for r in data["results"])


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
