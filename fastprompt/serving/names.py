"""The names ``python -m fastprompt serve`` answers to, checked before vLLM's engine starts (no vLLM here).

- The base model's served name: vLLM's ``--served-model-name`` when given, else
  :func:`default_served_name`: the model directory's own name (a hub name as given), never a server path:
  vLLM's default, the path, would reach every client in ``/v1/models``, each response's ``model`` and the
  404s' list of valid names.
- :func:`check_served_names`: that default name must not be an adapter's (``--adapter`` or one of
  ``--adapter-dir``'s at start-up), and ``--default-model`` must name a model the server serves.
"""

from __future__ import annotations

import os

from .adapter_dir import AdapterDirectory, valid_name
from .prompts import config_num_tasks, task_of


class ServeArgumentError(ValueError):
    """The served names of ``python -m fastprompt serve`` contradict each other: reported before the
    engine starts, naming the flag that resolves it."""


def default_served_name(model: str) -> str:
    """The base model's served name when ``--served-model-name`` is not given: the last component of a
    local path (``/srv/models/llama-3-8b/`` -> ``llama-3-8b``), or ``model`` itself where no such file or
    directory exists (a hub name such as ``org/name``: no path of this machine)."""
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        return model
    return os.path.basename(os.path.normpath(os.path.abspath(path))) or "model"


def _directory_clash(adapter_dir, served: tuple[str, ...]) -> str | None:
    """The first of ``served`` that ``adapter_dir`` serves now (None: none): an adapter ``DIR/NAME`` of
    that name (a multitask one too, whose tasks that name would hide), or ``NAME.taskT`` where ``DIR/NAME``
    is a multitask adapter with more than T tasks (its config's ``num_tasks``). Looks at one entry and one
    config per served name: no task name is built, however many tasks a config claims. Nothing is loaded."""
    directory = AdapterDirectory(adapter_dir, lambda files: None)
    for name in served:
        if not valid_name(name):
            continue  # never looked up in DIR
        if directory.holds(name):
            return name
        task = task_of(name)
        if task is not None:
            tasks = config_num_tasks(directory.read_config(task[0]))
            if tasks is not None and task[1] < tasks:
                return name
    return None


def check_served_names(
    served: tuple[str, ...],
    *,
    named: bool,
    adapters: tuple[str, ...] = (),
    adapter_names: tuple[str, ...] = (),
    adapter_dir=None,
    default_model: str | None = None,
    other_models: tuple[str, ...] = (),
) -> None:
    """``ServeArgumentError`` unless the names fit together.

    Args:
        served: the base model's served names.
        named: whether the operator gave them (``--served-model-name``); if not, the default name
            (:func:`default_served_name`) must not be the name of an ``--adapter`` or of an adapter in
            ``adapter_dir`` now (a served name of the operator's own choosing hides ``adapter_dir``'s
            adapter of that name, as the README's precedence says).
        adapters: the served names of the ``--adapter`` ones (a multitask adapter's tasks included).
        adapter_names: the names the ``--adapter`` ones are loaded as (``--adapter NAME=DIR``'s NAME): a
            multitask adapter's NAME serves no model (its tasks do), yet no served name may be it either.
        adapter_dir: ``--adapter-dir``, or None.
        default_model: ``--default-model``: a base model's served name, an adapter's, one of
            ``other_models`` (vLLM's LoRA modules), or a name ``adapter_dir`` may hold (looked up there per
            request, as any name).
    """
    for name in served:
        if name in adapters or name in adapter_names:
            fix = (
                "rename the adapter"
                if named
                else "give the base model another name with --served-model-name NAME"
            )
            raise ServeArgumentError(
                f"the base model's served name {name!r} is also the name of an --adapter: {fix} "
                "(the base model's name serves no soft prompt)"
            )
    if not named and adapter_dir is not None:
        clash = _directory_clash(adapter_dir, served)
        if clash is not None:
            raise ServeArgumentError(
                f"the base model's served name {clash!r} (its directory's name, the default) is also the "
                f"name of an adapter in --adapter-dir: give the base model another name with "
                "--served-model-name NAME"
            )
    if default_model is None:
        return
    if not isinstance(default_model, str) or not default_model.strip():
        raise ServeArgumentError("--default-model must name a model, got an empty name")
    if default_model in served or default_model in adapters or default_model in other_models:
        return
    if adapter_dir is not None and valid_name(default_model):
        return
    known = [*served, *adapters, *other_models]
    where = " or an adapter of --adapter-dir" if adapter_dir is not None else ""
    raise ServeArgumentError(
        f"--default-model {default_model!r} names no model this server serves: give one of {known}{where}"
    )
