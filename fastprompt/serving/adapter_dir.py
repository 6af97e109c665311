"""A directory of soft prompts served by name, on demand: every ``DIR/NAME`` holding a PEFT prompt-tuning or
P-tuning adapter is the model ``NAME`` (a multitask adapter's tasks: ``fastprompt.serving.prompts``).

:class:`AdapterDirectory` owns what that takes, and nothing else (no vLLM, no HTTP):

- the name rule (:func:`valid_name`): one plain path component, taken as given (nothing is decoded);
- files opened only inside DIR, through :mod:`fastprompt.serving.confined_files` (the security boundary:
  nothing here opens a path itself);
- loading on first use, at most ``max_loaded`` tables kept (least recently used dropped), one load for
  concurrent first requests of a name (the others wait for it, in their threads);
- never stale: every lookup compares the files' ``stat`` (device, inode, size, mtime, ctime) with the
  loaded table's, and re-reads the bytes while a file's mtime is too close to the read to tell an
  in-place rewrite apart (git's "racy clean" rule); files changing while read are retried, then an error;
- an event per load / reload / eviction / failed load for listeners (the server logs them and counts
  them as metrics).

A caller gets a table (a tensor it keeps: eviction or a reload only drops the store's reference, so a
request that resolved its table never loses it), :class:`UnknownAdapterError` (no such adapter in DIR:
a 404) or ``AdapterFileError`` (the adapter's files are bad: a 400). Messages name the adapter, never a
server path.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..prompted_embeds.adapter_files import BIN_NAME, SAFETENSORS_NAME, AdapterFileError, AdapterFiles
from ..prompted_embeds.config import CONFIG_NAME
from .confined_files import ConfinedDir, OutsideDirectory, read_whole

MAX_NAME_LENGTH = 128
# One plain path component: letters, digits, "_", "-", ".", not starting with "." or "-".
_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{MAX_NAME_LENGTH - 1}}}")
DEFAULT_MAX_LOADED = 256
# A file whose mtime lies this close to (or after) the moment its bytes were read may have been rewritten
# in place within one timestamp tick of the read: its bytes are compared again (coarse clocks, 2 s on FAT).
RACY_NS = 2_000_000_000
_FILES = (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME)
_READ_ATTEMPTS = 3

logger = logging.getLogger(__name__)


class UnknownAdapterError(ValueError):
    """No adapter of that name (a name outside the rule, no such subdirectory, no adapter_config.json in
    it, or a path that leaves the directory)."""


def valid_name(name) -> bool:
    """True if ``name`` is one plain path component a model name may be: 1 to ``MAX_NAME_LENGTH`` ASCII
    letters, digits, ``_``, ``-`` or ``.``, not starting with ``.`` or ``-``."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def _file_key(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class _Snapshot:
    """What was read of one adapter: each file's stat key (None: absent) and bytes."""

    keys: tuple
    data: dict[str, bytes | None]

    @property
    def digest(self) -> str:
        sha = hashlib.sha256()
        for name in _FILES:
            data = self.data.get(name)
            sha.update(b"-" if data is None else b"+%d:" % len(data) + data)
        return sha.hexdigest()


@dataclass
class _Entry:
    table: torch.Tensor
    keys: tuple
    digest: str
    read_ns: int  # when the bytes were read (or last found unchanged)


class AdapterDirectory:
    """The adapters of directory ``root`` by name, loaded on demand, at most ``max_loaded`` kept.

    Args:
        root: the directory (its real path is taken now; it must exist).
        read_table: ``AdapterFiles`` -> the checked [N, D] table (or a multitask adapter's [T, N, D]
            tables, one per task), raising ``AdapterFileError``.
        max_loaded: how many tables to keep (least recently used dropped); ``DEFAULT_MAX_LOADED``.
        listeners: callables ``(event, name, details)`` told of each ``"load"``, ``"reload"``,
            ``"evict"`` and ``"error"`` (a failed load); details: ``rows``, ``seconds``, ``error``, and
            ``tasks`` for a multitask adapter.
    """

    def __init__(
        self,
        root,
        read_table: Callable[[AdapterFiles], torch.Tensor],
        *,
        max_loaded: int | None = None,
        listeners: tuple = (),
    ):
        max_loaded = DEFAULT_MAX_LOADED if max_loaded is None else max_loaded
        if not isinstance(max_loaded, int) or isinstance(max_loaded, bool) or max_loaded < 1:
            raise ValueError(f"max_loaded_adapters must be a positive int, got {max_loaded!r}")
        self._root = ConfinedDir(root)
        self._read_table = read_table
        self.max_loaded = max_loaded
        self.listeners = list(listeners) or [log_event]
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, list] = {}  # name -> [lock, waiters]: one load per name at a time

    def loaded(self) -> list[str]:
        """The names whose tables are held now, least recently used first."""
        with self._lock:
            return list(self._entries)

    def names(self) -> list[str]:
        """The adapters of the directory now (sorted): entries with a valid name holding an
        adapter_config.json, none of their files resolving outside the directory. Nothing is loaded."""
        try:
            entries = sorted(entry.name for entry in os.scandir(self._root.real))
        except OSError:
            return []
        return [name for name in entries if self.holds(name)]

    def holds(self, name) -> bool:
        """Whether :meth:`names` lists ``name`` now, by looking at ``DIR/name`` alone. Nothing is loaded."""
        return valid_name(name) and self._has_config(name)

    def read_config(self, name: str) -> dict | None:
        """Adapter ``name``'s ``adapter_config.json`` as a dict (opened inside DIR as its files are), or None
        where there is none or it cannot be read. Loads nothing."""
        import json

        if not valid_name(name):
            return None
        try:
            fd = self._open(name, CONFIG_NAME)
        except (UnknownAdapterError, AdapterFileError):
            return None
        if fd is None:
            return None
        try:
            config = json.loads(read_whole(fd, name, CONFIG_NAME, os.fstat(fd).st_size))
        except (OSError, ValueError, AdapterFileError):
            return None
        finally:
            os.close(fd)
        return config if isinstance(config, dict) else None

    def _has_config(self, name: str) -> bool:
        try:
            self._keys(name)
        except UnknownAdapterError:
            return False
        except AdapterFileError:
            return True  # an adapter, whose files cannot be opened: its requests say why
        return True

    def table(self, name) -> torch.Tensor:
        """The current table of adapter ``name``, loaded or reloaded if its files are new or changed.

        Raises:
            UnknownAdapterError: no adapter ``name`` in the directory (404).
            AdapterFileError: its files are bad (400); a table held from before is dropped.
        """
        if not valid_name(name):
            raise UnknownAdapterError(_unknown(name))
        try:
            keys = self._keys(name)
        except UnknownAdapterError:
            with self._lock:  # deleted: its table goes too
                self._entries.pop(name, None)
            raise
        entry = self._fresh(name, keys)
        if entry is not None:
            return entry.table
        with self._load_lock(name):
            entry = self._fresh(name, self._keys(name))  # loaded by the request this one waited for
            return entry.table if entry is not None else self._load(name)

    def _fresh(self, name: str, keys: tuple) -> _Entry | None:
        """The held entry of ``name`` if ``keys`` (the files' stat now) say it is current."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.keys != keys or _racy(keys, entry.read_ns):
                return None
            self._entries.move_to_end(name)
            return entry

    def _load(self, name: str) -> torch.Tensor:
        start = time.perf_counter()
        read_ns = time.time_ns()
        snapshot = self._snapshot(name)
        with self._lock:
            held = self._entries.get(name)
        if held is not None and held.digest == snapshot.digest:
            with self._lock:  # the same bytes: only the check is renewed
                held.keys, held.read_ns = snapshot.keys, read_ns
                if name in self._entries:
                    self._entries.move_to_end(name)
            return held.table
        files = AdapterFiles(name, lambda file: snapshot.data.get(file))
        try:
            table = self._read_table(files)
        except AdapterFileError as err:
            with self._lock:
                dropped = self._entries.pop(name, None)
            self._emit("error", name, error=str(err), dropped=dropped is not None)
            raise
        entry = _Entry(table, snapshot.keys, snapshot.digest, read_ns)
        with self._lock:
            self._entries[name] = entry
            self._entries.move_to_end(name)
            evicted = []
            while len(self._entries) > self.max_loaded:
                evicted.append(self._entries.popitem(last=False)[0])
        seconds = time.perf_counter() - start
        rows = table.shape[-2]  # [N, D], or a multitask adapter's [T, N, D]
        tasks = {"tasks": table.shape[0]} if table.dim() == 3 else {}
        self._emit("reload" if held is not None else "load", name, rows=rows, seconds=seconds, **tasks)
        for old in evicted:
            self._emit("evict", old)
        return table

    def _keys(self, name: str) -> tuple:
        """Each file's stat key (None: absent); ``UnknownAdapterError`` if ``name`` is no adapter here."""
        keys = []
        for file in _FILES:
            fd = self._open(name, file)
            if fd is None:
                keys.append(None)
                continue
            try:
                keys.append(_file_key(os.fstat(fd)))
            finally:
                os.close(fd)
        if keys[0] is None:  # no adapter_config.json: not an adapter (or no directory at all)
            raise UnknownAdapterError(_unknown(name))
        return tuple(keys)

    def _open(self, name: str, file: str) -> int | None:
        try:
            return self._root.open(os.path.join(name, file))
        except OutsideDirectory:
            # the adapter's directory or one of its files resolves outside DIR: not an adapter of DIR
            raise UnknownAdapterError(_unknown(name)) from None
        except OSError as exc:
            raise AdapterFileError(f"Cannot open {name}/{file}: {exc.strerror or exc}") from None

    def _snapshot(self, name: str) -> _Snapshot:
        """The adapter's files read whole, each unchanged from its stat before the read to after it."""
        for _ in range(_READ_ATTEMPTS):
            keys, data = [], {}
            for file in _FILES:
                fd = self._open(name, file)
                if fd is None:
                    keys.append(None)
                    data[file] = None
                    continue
                try:
                    before = os.fstat(fd)
                    data[file] = read_whole(fd, name, file, before.st_size)
                    keys.append(_file_key(before))
                finally:
                    os.close(fd)
            if keys[0] is None:
                raise UnknownAdapterError(_unknown(name))
            if tuple(keys) == self._keys(name):
                return _Snapshot(tuple(keys), data)
        raise AdapterFileError(
            f"{name}: its files changed while they were read ({_READ_ATTEMPTS} times): still being written?"
        )

    @contextlib.contextmanager
    def _load_lock(self, name: str):
        """Hold ``name``'s load lock (created with its first user, dropped with its last)."""
        with self._lock:
            slot = self._loading.setdefault(name, [threading.Lock(), 0])
            slot[1] += 1
        try:
            with slot[0]:
                yield
        finally:
            with self._lock:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._loading[name]

    def _emit(self, event: str, name: str, **details) -> None:
        for listener in self.listeners:
            try:
                listener(event, name, details)
            except Exception:  # a listener's fault never fails a request
                logger.exception("prompt adapter event listener failed")


def _racy(keys: tuple, read_ns: int) -> bool:
    return any(key is not None and key[3] >= read_ns - RACY_NS for key in keys)


def _unknown(name) -> str:
    shown = name if not isinstance(name, str) or len(name) <= 80 else name[:80] + "..."
    return f"The model `{shown!s}` does not exist."


def log_event(event: str, name: str, details: dict) -> None:
    """The default listener: one log line per event."""
    if event == "error":
        logger.warning("Prompt adapter %r failed to load: %s", name, details["error"])
    elif event == "evict":
        logger.info("Evicted prompt adapter %r (least recently used)", name)
    else:
        verb = "Loaded" if event == "load" else "Reloaded (its files changed)"
        what = f"{details['rows']} rows"
        if "tasks" in details:  # a multitask adapter: its tasks' tables
            what = f"{details['tasks']} tasks of {what}"
        logger.info("%s prompt adapter %r: %s in %.1f ms", verb, name, what, 1e3 * details["seconds"])
