"""Smoke tests of ``python -m fastprompt bench | check | demo`` (run by ``pytest bench``; skipped by
``--benchmark-only``, which keeps only the benchmarks)."""

from __future__ import annotations

import json
import warnings

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


def _bench_small_gpt2(tmp_path, capsys, n_positions: int):
    """``bench --model DIR`` on a tiny GPT-2 with ``n_positions`` positions, saved with ``save_pretrained``
    as a user's model would be: (exit code, the JSON written, what was printed)."""
    from transformers import GPT2LMHeadModel

    from fastprompt.testing import tiny_models

    torch.manual_seed(0)
    directory = tmp_path / "gpt2"
    GPT2LMHeadModel(tiny_models.config("gpt2", n_positions=n_positions)).save_pretrained(directory)
    path = tmp_path / "bench.json"
    argv = ["bench", "--model", str(directory), "--providers", "peft,fastprompt", "--budget", "0.01"]
    code = main([*argv, "--json", str(path)])
    return code, json.loads(path.read_text()), capsys.readouterr()


def test_bench_model_with_few_positions_fits_its_lengths(tmp_path, capsys):
    """A model with 64 positions: the 20 virtual + 64 tokens of the training step do not fit, so the step
    runs shrunk (and says so); generation fits. PEFT's generation is timed where it is correct
    (uncached on transformers >= 5.24, where its cached path would also run past the 64 positions)."""
    from fastprompt.benchmarks.models import peft_generation_uses_cache

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, data, captured = _bench_small_gpt2(tmp_path, capsys, 64)
    assert code == 0 and "Traceback" not in captured.err
    position_ids = [w for w in seen if "Position ids" in str(w.message)]
    assert not position_ids, position_ids[0]  # PEFT's warning about ids transformers' generate built
    workloads = {r["workload"] for r in data["results"]}
    assert {"train step B=8 L=44 T=20", "train step bf16 autocast B=8 L=44 T=20"} <= workloads, workloads
    assert any(w.startswith("generate 16 tok B=2 L=16 T=20") for w in workloads), workloads
    assert all(r["matches_peft"] for r in data["results"])
    notes = data["meta"]["notes"]
    assert any("train step shrunk" in line and "64 positions" in line for line in notes), notes
    use_cache, note = peft_generation_uses_cache()
    if not use_cache:
        assert note in notes and "use_cache=False" in captured.out
        assert any(w.endswith("peft uncached") for w in workloads), workloads


def test_bench_model_without_room_skips_model_workloads_and_writes_the_rest(tmp_path, capsys):
    """16 positions leave no room after 20 virtual tokens: the model-level workloads are skipped with a
    note, the op-level rows (from the model's table) are still measured and written."""
    code, data, captured = _bench_small_gpt2(tmp_path, capsys, 16)
    assert code == 0
    assert {r["workload"] for r in data["results"]} == {"forward", "forward+backward"}
    assert sum("skipped" in line for line in data["meta"]["notes"]) == 2
    assert "Notes:" in captured.out


def test_fit_lengths():
    from fastprompt.benchmarks.models import fit_lengths

    assert fit_lengths({"seq": 64}, 20, None) == {"seq": 64}
    assert fit_lengths({"seq": 64}, 20, 512) == {"seq": 64}
    assert fit_lengths({"seq": 64}, 20, 64) == {"seq": 44}
    assert fit_lengths({"prompt": 16, "new": 16}, 4, 20) == {"prompt": 8, "new": 8}
    assert fit_lengths({"a": 1, "b": 1, "c": 100}, 0, 3) == {"a": 1, "b": 1, "c": 1}
    assert fit_lengths({"seq": 64}, 20, 20) is None


def test_peft_generation_policy_follows_the_versions(monkeypatch):
    """PEFT 0.21 with transformers >= 5.24: uncached, with a note; before 5.24: PEFT's cache."""
    import peft
    import transformers

    from fastprompt.benchmarks.models import peft_generation_uses_cache

    monkeypatch.setattr(peft, "__version__", "0.21.2")
    monkeypatch.setattr(transformers, "__version__", "5.24.0")
    use_cache, note = peft_generation_uses_cache()
    assert not use_cache and "use_cache=False" in note and "5.24.0" in note
    monkeypatch.setattr(transformers, "__version__", "5.17.1")
    assert peft_generation_uses_cache() == (True, None)
