"""The soft prompts a server holds, and the ``prompt_embeds`` of a request: adapter rows, then token rows.

Prompt-tuning and P-tuning adapters (PEFT stores P-tuning's final encoder rows) serve under their name;
a multitask adapter loaded as NAME serves each task T as ``NAME.taskT``.

:class:`PromptAdapters` maps adapter names to prompt tables read from PEFT's files
(``fastprompt.prompted_embeds.adapter_files``: no PEFT needed). :meth:`PromptAdapters.embeds` builds one
request's [N + L, D] rows with ONE ``fastprompt.prompt_concat`` over the word table and the adapter's table,
in the word table's dtype: the same adapter gives byte-identical prompt rows in every request, which is what
lets vLLM's prefix cache (it hashes full KV blocks of ``prompt_embeds`` by their bytes) share them.

Adding or replacing an adapter swaps one dict entry: a request takes its adapter's table when its
embeddings are built, so it never mixes an old and a new table, and every later request sees the new one.
With a directory of adapters (``adapter_dir``: ``fastprompt.serving.adapter_dir``), a name that is none of
the adapters added by name is looked up there, loaded on demand: :meth:`PromptAdapters.resolve` gives a
request its table once, and the request builds its rows from that table whatever happens to the store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading

import torch

from ..ops import prompt_concat
from ..prompted_embeds.adapter_files import (
    SERVABLE_TYPES,
    AdapterFileError,
    AdapterFiles,
    load_multitask_adapter,
    load_prompt_adapter,
)
from ..prompted_embeds.config import CONFIG_NAME, MULTITASK_PROMPT_TUNING
from .adapter_dir import AdapterDirectory, UnknownAdapterError, valid_name
from .word_table import WordTable

logger = logging.getLogger(__name__)


def task_adapter_name(name: str, task: int) -> str:
    """The served name of task ``task`` of the multitask adapter loaded as ``name``: ``NAME.taskT``."""
    return f"{name}.task{task}"


_TASK_NAME = re.compile(r"(.+)\.task(0|[1-9][0-9]*)")


def task_of(served: str) -> tuple[str, int] | None:
    """(NAME, T) of a served name ``NAME.taskT`` (:func:`task_adapter_name`), else None."""
    match = _TASK_NAME.fullmatch(served) if isinstance(served, str) else None
    return None if match is None else (match.group(1), int(match.group(2)))


MAX_LISTED_TASKS = 1024  # a multitask adapter of the directory with more tasks is not listed (still served)
_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning("Prompt adapter directory: %s", message)


def config_num_tasks(config) -> int | None:
    """A multitask adapter config's ``num_tasks`` (a positive int), else None (another adapter type, or no
    readable config)."""
    if not isinstance(config, dict) or config.get("peft_type") != MULTITASK_PROMPT_TUNING:
        return None
    tasks = config.get("num_tasks")
    return tasks if isinstance(tasks, int) and not isinstance(tasks, bool) and tasks > 0 else None


def _is_multitask(path) -> bool:
    """Whether the adapter at ``path`` (a directory, or ``AdapterFiles``) is a multitask one."""
    return _peft_type(path) == MULTITASK_PROMPT_TUNING


PREFIX_TUNING = "PREFIX_TUNING"


def _refuse_prefix(path) -> None:
    """A prefix-tuning adapter: an ``AdapterFileError`` (a 400) that says why it cannot be served here."""
    if _peft_type(path) == PREFIX_TUNING:
        files = path if isinstance(path, AdapterFiles) else AdapterFiles(os.fspath(path), None)
        raise AdapterFileError(
            f"{files.file(CONFIG_NAME)} is a PREFIX_TUNING adapter: its keys/values go into every attention "
            "layer's cache, and vLLM's prompt-embeddings path carries only rows put before the tokens. "
            "Generate with fastprompt's PEFT integration instead (generate(..., adapter_names=[...]) mixes "
            "prefix adapters in one batch); see docs/prefix_tuning.md."
        )


def _peft_type(path):
    """The ``peft_type`` of the adapter config at ``path`` (a directory, or ``AdapterFiles``), or None."""
    try:
        if isinstance(path, AdapterFiles):
            data = path.read(CONFIG_NAME)
            config = json.loads(data) if data is not None else None
        else:
            with open(os.path.join(os.fspath(path), CONFIG_NAME)) as file:
                config = json.load(file)
    except (OSError, ValueError):
        return None  # load_prompt_adapter says what is wrong
    return config.get("peft_type") if isinstance(config, dict) else None


def read_served_table(files, model_dim: int | None = None) -> torch.Tensor:
    """What a directory of adapters holds for one adapter: the [N, D] table of a prompt-tuning or P-tuning
    adapter (:func:`read_adapter_table`), or a multitask adapter's [T, N, D] tables, task t's rows
    ``[t]`` (served as ``NAME.taskT``), float32, checked as :func:`read_adapter_tables` checks them."""
    if not _is_multitask(files):
        return read_adapter_table(files, model_dim)
    adapter = load_multitask_adapter(files, model_dim=model_dim)
    _check_causal_lm(files, adapter.config)
    return adapter.table.contiguous()


def read_adapter_tables(path, name: str, model_dim: int | None = None) -> dict[str, torch.Tensor]:
    """{served name: [N, D] table} of the adapter in ``path`` loaded as ``name``: ``{name: table}`` for a
    prompt-tuning or P-tuning adapter (:func:`read_adapter_table`), one entry per task for a multitask
    adapter, named by :func:`task_adapter_name` (``NAME.task0`` ... ``NAME.task{T-1}``), each the task's
    rows as PEFT computes them (float32)."""
    if not _is_multitask(path):
        return {name: read_adapter_table(path, model_dim)}
    adapter = load_multitask_adapter(path, model_dim=model_dim)
    _check_causal_lm(path, adapter.config)
    return {task_adapter_name(name, t): rows.contiguous() for t, rows in enumerate(adapter.table)}


def read_adapter_table(path, model_dim: int | None = None) -> torch.Tensor:
    """The [N, D] prompt table (CPU, the dtype it was saved in) of the PEFT prompt-tuning or P-tuning
    adapter in directory ``path`` (P-tuning's file holds the encoder's final rows: served as they are),
    checked for serving: PEFT's checks (``load_prompt_adapter``: config, weights file, shape, finite
    values, ``token_dim == model_dim`` when given), and a ``CAUSAL_LM`` (or untyped) adapter: a Seq2Seq
    adapter's 2N rows or a classification adapter are ``AdapterFileError``."""
    _refuse_prefix(path)
    adapter = load_prompt_adapter(path, model_dim=model_dim, peft_types=SERVABLE_TYPES)
    _check_causal_lm(path, adapter.config)
    return adapter.table.detach().to("cpu").contiguous()


def _check_causal_lm(path, config: dict) -> None:
    task_type = config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        files = path if isinstance(path, AdapterFiles) else AdapterFiles(os.fspath(path), None)
        raise AdapterFileError(
            f"{files.file(CONFIG_NAME)} is a {task_type} adapter; a served "
            "decoder-only model generates from one prompt of num_virtual_tokens rows: serve a CAUSAL_LM "
            "adapter."
        )


def check_adapter_name(name, reserved: tuple[str, ...] = ()) -> None:
    """ValueError unless ``name`` is a non-empty string that is not one of ``reserved`` (the base model's
    served names)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter_name must be a non-empty string, got {name!r}")
    if name in reserved:
        raise ValueError(
            f"adapter_name {name!r} is the base model's name, which serves no soft prompt; pick another."
        )


def check_adapter_dirs(adapter_dirs: dict) -> list[str]:
    """Check every name and read and check every adapter of {name: directory} before an engine starts
    (the hidden size is checked once the model's word table is read): a bad name or file fails fast, not
    after minutes of start-up. Returns the names they serve (a multitask adapter's tasks)."""
    served = []
    for name, path in adapter_dirs.items():
        check_adapter_name(name)
        served += read_adapter_tables(path, name)
    return served


class PromptAdapters:
    """Named prompt tables for one base model (whose word table is ``word_table``).

    ``reserved``: names that cannot be adapter names (the base model's served names). ``adapter_dir``: a
    directory whose subdirectories are adapters by name, loaded on demand (``AdapterDirectory``: at most
    ``max_loaded`` kept, ``listeners`` told of each load, reload and eviction); the adapters added with
    :meth:`load` win over its names, and ``reserved`` names are never looked up there.
    """

    def __init__(
        self,
        word_table: WordTable,
        reserved: tuple[str, ...] = (),
        *,
        adapter_dir=None,
        max_loaded: int | None = None,
        listeners: tuple = (),
    ):
        self.word_table = word_table
        self.reserved = tuple(reserved)
        self._tables: dict[str, torch.Tensor] = {}
        self._paths: dict[str, str] = {}
        self._groups: dict[str, tuple[str, ...]] = {}  # multitask: loaded name -> its tasks' names
        self._lock = threading.Lock()
        self.directory = None
        if adapter_dir is not None:
            dim = word_table.dim
            self.directory = AdapterDirectory(
                adapter_dir,
                lambda files: read_served_table(files, model_dim=dim),
                max_loaded=max_loaded,
                listeners=listeners,
            )

    def __contains__(self, name) -> bool:
        """True for the adapters added by name (a directory's are known only by :meth:`resolve`)."""
        return isinstance(name, str) and name in self._tables

    def names(self) -> list[str]:
        """The adapters added by name, in the order they were first added."""
        return list(self._tables)

    def directory_names(self) -> list[str]:
        """The adapters of the directory now, less those the added ones and ``reserved`` hide (none without
        a directory): a multitask adapter NAME as its tasks ``NAME.taskT`` (by its config's ``num_tasks``,
        at most ``MAX_LISTED_TASKS``). Lists the directory and reads the configs: nothing is loaded."""
        if self.directory is None:
            return []
        hidden = self._hidden()
        names = []
        for name in self.directory.names():
            if name in hidden:  # an added adapter (or the base model) of that name wins, tasks and all
                continue
            tasks = config_num_tasks(self.directory.read_config(name))
            if tasks is None:
                names.append(name)
            elif tasks > MAX_LISTED_TASKS:
                _warn_once(f"{name}: num_tasks={tasks}, more than the {MAX_LISTED_TASKS} tasks listed")
            else:
                served = [task_adapter_name(name, t) for t in range(tasks)]
                if not valid_name(served[-1]):
                    _warn_once(f"{name}: its task names ({served[-1]!r}) break the name rule (too long)")
                names += served
        return [n for n in dict.fromkeys(names) if n not in hidden and valid_name(n)]

    def _hidden(self) -> set:
        return set(self._tables) | set(self._groups) | set(self.reserved)

    def path(self, name: str) -> str:
        """The directory adapter ``name`` was loaded from."""
        self._check_known(name)
        return self._paths[name]

    def load(self, path, name: str) -> None:
        """Add adapter ``name`` from the PEFT adapter directory ``path``, or replace it.

        The files are read and checked first (``AdapterFileError`` names the file and the problem); on any
        error nothing changes and the adapters already held keep serving.
        """
        check_adapter_name(name, self.reserved)
        tables = read_adapter_tables(path, name, model_dim=self.word_table.dim)
        for served in tables:
            check_adapter_name(served, self.reserved)
        with self._lock:
            for served in self._groups.pop(name, ()):  # a multitask adapter replaced: all its tasks
                self._tables.pop(served, None)
                self._paths.pop(served, None)
            for served, table in tables.items():
                self._tables[served] = table
                self._paths[served] = os.fspath(path)
            if list(tables) != [name]:
                self._groups[name] = tuple(tables)

    def delete(self, name: str) -> None:
        """Remove adapter ``name`` (ValueError if there is none); the name a multitask adapter was loaded
        as removes all its tasks, ``NAME.taskT`` one of them."""
        with self._lock:
            group = self._groups.pop(name, None)
            if group is not None:
                for served in group:
                    self._tables.pop(served, None)
                    self._paths.pop(served, None)
                return
            self._check_known(name)
            del self._tables[name]
            del self._paths[name]

    def _check_known(self, name) -> None:
        if name not in self:
            raise self._unknown(name)

    def _unknown(self, name) -> UnknownAdapterError:
        where = " or a subdirectory of the adapter directory" if self.directory is not None else ""
        return UnknownAdapterError(
            f"Unknown prompt adapter {name!r}; the loaded adapters are {self.names()}{where} "
            "(None: the base model, no soft prompt)."
        )

    def table(self, name: str) -> torch.Tensor:
        """The [N, D] prompt table of adapter ``name`` added by name (ValueError naming them if unknown)."""
        table = self._tables.get(name) if isinstance(name, str) else None
        if table is None:
            self._check_known(name)
        return table

    def resolve(self, name) -> torch.Tensor:
        """The [N, D] table a request for ``name`` uses: an adapter added by name, else the directory's
        (loaded or reloaded as needed; may read files: call it off an event loop).

        Raises:
            UnknownAdapterError: (a ValueError) no adapter of that name.
            AdapterFileError: the directory's adapter ``name`` has bad files.
        """
        table = self._tables.get(name) if isinstance(name, str) else None
        if table is not None:
            return table
        if self.directory is None or name in self.reserved or not valid_name(name):
            raise self._unknown(name)
        task = task_of(name)
        # DIR/NAME itself (its bad files: a 400), unless it is a multitask adapter, whose tasks are the
        # models. Configs are read only for names of the task form: the common request costs no more.
        if task is None or config_num_tasks(self.directory.read_config(name)) is None:
            try:
                table = self.directory.table(name)
            except UnknownAdapterError:
                table = None  # no such adapter: maybe a task of a multitask adapter
            if table is not None:
                if table.dim() != 2:  # a multitask adapter (or one since its config was read)
                    raise self._unknown(name)
                return table
        # NAME.taskT: task T of the directory's multitask adapter NAME. Only a multitask NAME is loaded.
        if task is None or task[0] in self._hidden():
            raise self._unknown(name)
        if config_num_tasks(self.directory.read_config(task[0])) is None:
            raise self._unknown(name)
        try:
            tables = self.directory.table(task[0])
        except UnknownAdapterError:
            raise self._unknown(name) from None
        if tables.dim() != 3 or task[1] >= tables.shape[0]:
            raise self._unknown(name)
        return tables[task[1]]

    def embeds(self, name: str, token_ids, table: torch.Tensor | None = None) -> torch.Tensor:
        """[N + L, D] prompt embeddings in the word table's dtype (CPU): adapter ``name``'s N rows (``table``
        when given: the one the request resolved), then the word-embedding rows of ``token_ids`` (L
        ints), built by one ``prompt_concat``."""
        if table is None:
            table = self.table(name)
        ids = torch.as_tensor(list(token_ids), dtype=torch.long).reshape(1, -1)
        vocab = self.word_table.weight.shape[0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(
                f"token ids must lie in [0, {vocab}) for this model's vocabulary; got ids from "
                f"{int(ids.min())} to {int(ids.max())}"
            )
        word = self.word_table
        with torch.no_grad():
            out = prompt_concat(
                ids, word.weight, table, embed_scale=word.embed_scale, padding_idx=word.padding_idx
            )
        return out[0]
