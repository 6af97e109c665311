"""The directory of soft prompts served by name (``fastprompt.serving.adapter_dir``), without vLLM: the name
rule, nothing opened outside the directory, one load for concurrent first requests, reload on change
(in place within a timestamp tick too), the LRU bound, bad files, deletion."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch

from fastprompt.prompted_embeds.adapter_files import AdapterFileError
from fastprompt.serving.adapter_dir import (
    MAX_NAME_LENGTH,
    AdapterDirectory,
    UnknownAdapterError,
    valid_name,
)
from fastprompt.serving.prompts import read_adapter_table
from fastprompt.testing.adapter_files import (
    ESCAPING_NAMES,
    SERVING_BAD_FILES,
    add_escaping_links,
    corrupt_adapter,
    save_prompt_adapter,
)

DIM = 16


def _table(seed: int, rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tree(tmp_path):
    """(DIR, outside): DIR holds alpha, beta, a nested adapter and the escaping links and hidden copy;
    outside (next to DIR) holds a valid adapter nobody may reach."""
    root, outside = tmp_path / "adapters", tmp_path / "outside"
    for name, seed in (("alpha", 1), ("beta", 2)):
        save_prompt_adapter(root / name, _table(seed))
    save_prompt_adapter(root / "sub" / "alpha", _table(4))
    save_prompt_adapter(outside, _table(5))
    add_escaping_links(root, outside)
    return root, outside


def _store(root, events=None, **kwargs):
    listeners = (lambda event, name, details: events.append((event, name)),) if events is not None else ()
    return AdapterDirectory(
        root, lambda files: read_adapter_table(files, model_dim=DIM), listeners=listeners, **kwargs
    )


def test_name_rule():
    for name in ["alpha", "a", "A-b_c.d", "tenant.v2", "_x", "9", "a" * MAX_NAME_LENGTH]:
        assert valid_name(name), name
    for name in [*ESCAPING_NAMES[:-2], None, 7, b"alpha"]:
        assert not valid_name(name), name


@pytest.fixture
def opened(monkeypatch):
    """The real path of every file or directory ``os.open`` opens while the test runs."""
    seen = []
    real_open = os.open

    def recording_open(path, flags, mode=0o777, *, dir_fd=None):
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    return seen


@pytest.mark.parametrize("name", ESCAPING_NAMES, ids=repr)
def test_escapes_are_unknown_and_open_nothing_outside(tree, opened, name):
    root, outside = tree
    store = _store(root)
    with pytest.raises(UnknownAdapterError) as info:
        store.table(name)
    assert str(root) not in str(info.value) and str(outside) not in str(info.value)
    real_root = os.path.realpath(root)
    assert all(path == real_root or path.startswith(real_root + os.sep) for path in opened), opened


def test_serves_links_that_stay_inside(tree):
    root, _ = tree
    os.symlink(root / "alpha", root / "alias")
    store = _store(root)
    assert torch.equal(store.table("alias"), _table(1))
    assert store.names() == ["alias", "alpha", "beta"]  # no hidden, nested, escaping or linked-out names


def test_concurrent_first_requests_load_once(tree):
    root, _ = tree
    events = []
    store = _store(root, events)
    barrier = threading.Barrier(16)
    results = []

    def request():
        barrier.wait()
        results.append(store.table("alpha"))

    threads = [threading.Thread(target=request) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert events == [("load", "alpha")]
    assert len(results) == 16 and all(t is results[0] for t in results)


def test_reload_on_change_even_in_place_within_a_tick(tree):
    root, _ = tree
    events = []
    store = _store(root, events)
    first = store.table("alpha")
    again = store.table("alpha")
    assert again is first  # unchanged bytes: no reload
    # rewrite in place, same size, then put the old mtime back: only the bytes tell
    path = root / "alpha" / "adapter_model.safetensors"
    before = os.stat(path)
    save_prompt_adapter(root / "alpha", _table(11))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert torch.equal(store.table("alpha"), _table(11))
    assert torch.equal(first, _table(1))  # the table a request already holds is untouched
    # an atomic replace (a new inode)
    save_prompt_adapter(root / "tmp", _table(12))
    os.replace(root / "tmp" / "adapter_model.safetensors", path)
    assert torch.equal(store.table("alpha"), _table(12))
    assert [e for e in events if e[0] != "load"] == [("reload", "alpha"), ("reload", "alpha")]


def test_least_recently_used_is_evicted(tree):
    root, _ = tree
    events = []
    store = _store(root, events, max_loaded=2)
    for name in ("alpha", "beta"):
        save_prompt_adapter(root / f"{name}2", _table(20))
    held = store.table("alpha")
    store.table("beta")
    store.table("alpha")  # alpha used last: beta goes first
    store.table("alpha2")
    assert store.loaded() == ["alpha", "alpha2"] and ("evict", "beta") in events
    store.table("beta2")
    assert store.loaded() == ["alpha2", "beta2"] and ("evict", "alpha") in events
    assert torch.equal(held, _table(1))  # evicted from the store, not from the request holding it
    assert torch.equal(store.table("alpha"), _table(1)) and events[-2] == ("load", "alpha")


@pytest.mark.parametrize("how", SERVING_BAD_FILES)
def test_bad_files_name_the_adapter_not_the_path(tree, how):
    root, _ = tree
    events = []
    store = _store(root, events)
    store.table("beta")
    store.table("alpha")
    corrupt_adapter(root / "alpha", how)
    error = UnknownAdapterError if how == "no_config" else AdapterFileError
    with pytest.raises(error) as info:
        store.table("alpha")
    message = str(info.value)
    assert str(root) not in message and os.path.realpath(root) not in message
    if how != "no_config":
        assert "alpha" in message, message
        assert events[-1][0] == "error"
    assert store.loaded() == ["beta"]  # never served stale
    assert torch.equal(store.table("beta"), _table(2))
    save_prompt_adapter(root / "alpha", _table(1))  # fixed: served again
    assert torch.equal(store.table("alpha"), _table(1))


def test_half_written_then_whole(tree):
    root, _ = tree
    store = _store(root)
    target = root / "gamma"
    save_prompt_adapter(target, _table(7))
    data = (target / "adapter_model.safetensors").read_bytes()
    (target / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="gamma/adapter_model.safetensors is not a readable"):
        store.table("gamma")
    (target / "adapter_model.safetensors").write_bytes(data)
    assert torch.equal(store.table("gamma"), _table(7))


def test_added_and_deleted_while_serving(tree):
    root, _ = tree
    store = _store(root)
    with pytest.raises(UnknownAdapterError):
        store.table("delta")
    save_prompt_adapter(root / "delta", _table(8))
    assert torch.equal(store.table("delta"), _table(8)) and "delta" in store.names()
    shutil.rmtree(root / "delta")
    with pytest.raises(UnknownAdapterError):
        store.table("delta")
    assert "delta" not in store.names()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        _store(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="positive int"):
        _store(tmp_path, max_loaded=0)


def test_prefix_tuning_adapter_is_a_400_that_says_why(tree):
    """A prefix adapter's keys/values cannot ride vLLM's prompt-embeddings path: an AdapterFileError (400)
    naming the adapter and the reason, not the server's paths."""
    import json

    root, _ = tree
    store = _store(root)
    save_prompt_adapter(root / "prefix", _table(3))
    config_file = root / "prefix" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING", "prefix_projection": False}))
    with pytest.raises(AdapterFileError, match="PREFIX_TUNING adapter: its keys/values") as info:
        store.table("prefix")
    assert str(root) not in str(info.value) and "prefix" in str(info.value)
    assert "vLLM" in str(info.value) and "adapter_names" in str(info.value)
