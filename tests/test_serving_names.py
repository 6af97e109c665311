"""The served names of ``python -m fastprompt serve``, checked before vLLM's engine starts
(``fastprompt.serving.names``; no vLLM needed; the server itself: tests/vllm_serving/test_server_names.py)."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest
import torch

from fastprompt.prompted_embeds.config import CONFIG_NAME
from fastprompt.serving.names import ServeArgumentError, check_served_names, default_served_name
from fastprompt.serving.prompts import check_adapter_dirs
from fastprompt.testing import tiny_models
from fastprompt.testing.adapter_files import save_multitask_adapter, save_prompt_adapter


def test_the_default_served_name_is_the_directorys_name_never_a_path(tmp_path, monkeypatch):
    model = tmp_path / "srv" / "llama-3-8b"
    model.mkdir(parents=True)
    assert default_served_name(str(model)) == "llama-3-8b"
    assert default_served_name(f"{model}/") == "llama-3-8b"
    assert default_served_name(f"{model}/../llama-3-8b") == "llama-3-8b"
    monkeypatch.chdir(tmp_path / "srv")
    assert default_served_name("llama-3-8b") == "llama-3-8b"
    assert default_served_name(".") == "srv"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_served_name("~/srv/llama-3-8b") == "llama-3-8b"
    # a hub name (no such file or directory here) stays as given: it is no path of this machine
    assert default_served_name("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"


def _adapters(root, names):
    for name in names:
        save_prompt_adapter(root / name, torch.zeros(2, tiny_models.HIDDEN))


def test_a_default_name_that_is_an_adapters_names_the_flag_that_resolves_it(tmp_path):
    _adapters(tmp_path, ["base", "t00"])
    with pytest.raises(ServeArgumentError, match=r"'base' \(its directory's name.*--served-model-name NAME"):
        check_served_names(("base",), named=False, adapter_dir=tmp_path)
    with pytest.raises(
        ServeArgumentError, match="also the name of an --adapter: give the base model another"
    ):
        check_served_names(("base",), named=False, adapters=("base",))
    # the operator's own name: it hides DIR/base (the README's precedence), but an --adapter may not have it
    check_served_names(("base",), named=True, adapter_dir=tmp_path)
    with pytest.raises(ServeArgumentError, match="also the name of an --adapter: rename the adapter"):
        check_served_names(("base",), named=True, adapters=("base",))
    check_served_names(("other",), named=False, adapters=("t00",), adapter_dir=tmp_path)


def _multitask(directory, tasks=2):
    hidden = tiny_models.HIDDEN
    save_multitask_adapter(
        directory, torch.zeros(2, hidden), torch.ones(tasks, 2, 1), torch.ones(tasks, 1, hidden)
    )


@pytest.mark.parametrize("named", [False, True])
def test_a_served_name_that_is_a_multitask_adapters_name(tmp_path, named):
    """``--adapter mt=DIR`` with a multitask DIR serves mt.task0 and mt.task1, not mt, yet loading it as mt
    under a base model served as mt fails (its name is reserved): caught before the engine starts, as the
    server checks it (check_adapter_dirs' served names, and the --adapter names themselves)."""
    _multitask(tmp_path / "mt")
    adapter_dirs = {"mt": str(tmp_path / "mt")}
    served = check_adapter_dirs(adapter_dirs)
    assert served == ["mt.task0", "mt.task1"]
    fix = "rename the adapter" if named else "--served-model-name NAME"
    with pytest.raises(ServeArgumentError, match=rf"'mt' is also the name of an --adapter: .*{fix}"):
        check_served_names(("mt",), named=named, adapters=tuple(served), adapter_names=tuple(adapter_dirs))
    check_served_names(("base",), named=named, adapters=tuple(served), adapter_names=tuple(adapter_dirs))
    # mt itself serves nothing: it is no --default-model
    with pytest.raises(ServeArgumentError, match="--default-model 'mt' names no model"):
        check_served_names(
            ("base",), named=named, adapters=tuple(served), adapter_names=("mt",), default_model="mt"
        )


def test_a_default_name_that_is_a_task_of_the_directory(tmp_path):
    hidden = tiny_models.HIDDEN
    save_multitask_adapter(
        tmp_path / "mt", torch.zeros(2, hidden), torch.ones(2, 2, 1), torch.ones(2, 1, hidden)
    )
    with pytest.raises(ServeArgumentError, match="'mt.task1'"):
        check_served_names(("mt.task1",), named=False, adapter_dir=tmp_path)
    check_served_names(("mt.task2",), named=False, adapter_dir=tmp_path)


def test_a_huge_num_tasks_is_checked_without_building_its_task_names(tmp_path):
    """A config claiming 10**18 tasks: the start-up check compares the default name's T with num_tasks,
    never building NAME.task0 ... (3 million of them took 19 s and 340 MB; this many would never end)."""
    _multitask(tmp_path / "huge")
    config_path = tmp_path / "huge" / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_tasks": 10**18}))

    def enumerating(*_):
        raise TimeoutError("the check enumerates the tasks")

    previous = signal.signal(signal.SIGALRM, enumerating)  # a regression fails, it does not hang
    signal.alarm(20)
    try:
        start = time.perf_counter()
        for name in ("huge", "huge.task0", f"huge.task{10**18 - 1}"):
            with pytest.raises(ServeArgumentError, match=re.escape(repr(name))):
                check_served_names((name,), named=False, adapter_dir=tmp_path)
        for name in (f"huge.task{10**18}", "huge.task01", "huge.task-1", "huge.tasks1", "other.task0"):
            check_served_names((name,), named=False, adapter_dir=tmp_path)
        check_served_names(("huge",), named=True, adapter_dir=tmp_path)  # the operator's name hides it
        assert time.perf_counter() - start < 2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_the_default_model_must_name_a_served_model(tmp_path):
    check_served_names(("base",), named=False, default_model="base")
    check_served_names(("base",), named=False, adapters=("alpha",), default_model="alpha")
    check_served_names(("base",), named=False, default_model="lora", other_models=("lora",))
    check_served_names(("base",), named=False, adapter_dir=tmp_path, default_model="not_yet_there")
    for bad, where in [("nope", None), ("../x", tmp_path), ("", None), (" ", tmp_path)]:
        with pytest.raises(ServeArgumentError, match="--default-model"):
            check_served_names(("base",), named=False, adapter_dir=where, default_model=bad)
    with pytest.raises(ServeArgumentError, match=r"give one of \['base', 'alpha'\] or an adapter of"):
        check_served_names(
            ("base",), named=False, adapters=("alpha",), adapter_dir=tmp_path, default_model="/x"
        )
