"""``python -m fastprompt serve``'s arguments (the server itself is tested in tests/vllm_serving)."""

from __future__ import annotations

import importlib.util

import pytest

from fastprompt.cli.main import build_parser, main


def test_defaults_bind_this_machine_only_and_pass_unknown_arguments_to_vllm(tmp_path):
    args, extra = build_parser().parse_known_args(
        ["serve", "base", "--adapter", f"a={tmp_path}", "--dtype", "float32", "--tensor-parallel-size=2"]
    )
    assert args.command == "serve" and args.model == "base"
    assert args.host == "127.0.0.1" and args.port == 8000 and not args.allow_adapter_updates
    assert args.adapter == [f"a={tmp_path}"]
    assert extra == ["--dtype", "float32", "--tensor-parallel-size=2"]


@pytest.mark.parametrize(
    "pair,message",
    [
        ("noequals", "expected NAME=DIR"),
        ("=dir", "expected NAME=DIR"),
        ("a=/no/such/dir", "no such directory"),
    ],
)
def test_bad_adapter_arguments(pair, message, capsys):
    assert main(["serve", "base", "--adapter", pair]) == 2
    err = capsys.readouterr().err
    assert "python -m fastprompt serve: error: --adapter" in err and message in err


def test_twice_the_same_name(tmp_path, capsys):
    assert main(["serve", "base", "--adapter", f"a={tmp_path}", "--adapter", f"a={tmp_path}"]) == 2
    assert "given twice" in capsys.readouterr().err


def test_other_commands_still_refuse_unknown_arguments():
    with pytest.raises(SystemExit) as info:
        main(["check", "--bogus"])
    assert info.value.code == 2


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_says_how_to_install(tmp_path, capsys):
    assert main(["serve", "base", "--adapter", f"a={tmp_path}"]) == 2
    assert "serve needs vLLM" in capsys.readouterr().err


def test_adapter_dir_arguments(tmp_path):
    args, extra = build_parser().parse_known_args(
        ["serve", "base", "--adapter-dir", str(tmp_path), "--max-loaded-adapters", "16", "--dtype=float32"]
    )
    assert args.adapter_dir == str(tmp_path) and args.max_loaded_adapters == 16
    assert extra == ["--dtype=float32"]
    assert build_parser().parse_known_args(["serve", "base"])[0].adapter_dir is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--adapter-dir", "/no/such/dir"], "--adapter-dir '/no/such/dir': no such directory"),
        (["--max-loaded-adapters", "4"], "give --adapter-dir too"),
    ],
)
def test_bad_adapter_dir_arguments(argv, message, capsys):
    assert main(["serve", "base", *argv]) == 2
    assert message in capsys.readouterr().err


def test_max_loaded_adapters_must_be_positive(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["serve", "base", "--adapter-dir", str(tmp_path), "--max-loaded-adapters", "0"])
    assert info.value.code == 2


def test_default_model_argument(tmp_path, capsys):
    args, _ = build_parser().parse_known_args(["serve", "base", "--adapter-dir", str(tmp_path)])
    assert args.default_model is None
    args, _ = build_parser().parse_known_args(["serve", "base", "--default-model", "alpha"])
    assert args.default_model == "alpha"
    assert main(["serve", "base", "--default-model", " "]) == 2
    assert "--default-model must name a model" in capsys.readouterr().err


def test_help_states_the_default_model_and_the_served_name(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--default-model NAME" in text and "is a 404 with --adapter-dir" in text
    assert "An adapter or LoRA NAME serves it on completions and chat only" in text
    assert "by default MODEL's directory name" in text
