"""The package's shape: one direction of imports, one definition of each shared name.

Layers, each importing only itself and those before it: ``fastprompt.kernels`` <- ``fastprompt.ops`` <-
the module layer (``config``, ``embedding``, ``prompted_embeds``, ``word_embeddings``, ``adapter_files``) <-
``prompt_once`` (the prompt run once) <- ``integrations`` and ``serving`` (vLLM; beside each other,
neither imports the other) <- ``testing``
<- ``benchmarks`` <- ``cli``. The benchmark suite in ``bench/`` uses ``fastprompt.benchmarks``, not the
command line.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = {
    "kernels": 0,
    "ops": 1,
    "prompted_embeds": 2,  # the module layer (its own order: MODULE_LAYER below)
    "prompt_once": 3,  # the prompt run once: prompt pass, sharing policy and forwards, packing, KV store
    "integrations": 4,
    "serving": 4,  # serving soft prompts on vLLM: the module layer and vllm, never integrations (below)
    "vllm": 4,
    "": 4,  # fastprompt/__init__.py: the public facade over the layers up to integrations
    "testing": 5,
    "benchmarks": 6,
    "cli": 7,
    "__main__": 7,
}


def _module_files():
    for path in sorted((ROOT / "fastprompt").rglob("*.py")):
        yield "fastprompt." + ".".join(path.relative_to(ROOT / "fastprompt").with_suffix("").parts), path
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        yield "fastprompt.kernels." + ".".join(path.relative_to(ROOT / "kernels").with_suffix("").parts), path


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 and parts[1] != "__init__" else ""
    return LAYERS[top]


def _imports(module: str, path: pathlib.Path):
    """The fastprompt modules ``path`` imports (absolute and relative), as dotted names."""
    package = module.split(".")[:-1]  # fastprompt.ops.__init__ -> fastprompt.ops
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "fastprompt")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "fastprompt":
                continue
            if target == "fastprompt":  # ``from fastprompt import kernels`` names a subpackage
                names = [a.name for a in node.names]
                yield from (f"fastprompt.{n}" if n in LAYERS else "fastprompt" for n in names)
            else:
                yield target


@pytest.mark.parametrize("module,path", list(_module_files()), ids=lambda x: str(x))
def test_imports_go_one_way(module, path):
    own = _layer(module)
    upward = [target for target in _imports(module, path) if _layer(target) > own]
    assert not upward, f"{module} (layer {own}) imports {upward} from a later layer"


_SIDE_BY_SIDE = {"serving": ("integrations",), "vllm": ("integrations",), "integrations": ("serving", "vllm")}


@pytest.mark.parametrize(
    "module,path", [(m, p) for m, p in _module_files() if m.split(".")[1] in _SIDE_BY_SIDE], ids=str
)
def test_serving_and_the_peft_integration_do_not_import_each_other(module, path):
    """Serving needs no PEFT: it never imports the PEFT integration, nor the integration the serving."""
    others = _SIDE_BY_SIDE[module.split(".")[1]]
    crossing = [t for t in _imports(module, path) if len(t.split(".")) > 1 and t.split(".")[1] in others]
    assert not crossing, f"{module} imports {crossing}"


def test_no_import_cycles():
    """Within a layer too, imports go one way (module-level and deferred imports alike)."""
    modules = dict(_module_files())
    graph = {}
    for module, path in modules.items():
        targets = set()
        for target in _imports(module, path):
            while target and target not in modules and f"{target}.__init__" not in modules:
                target = target.rpartition(".")[0]
            target = target if target in modules else f"{target}.__init__"
            if target in modules and target != module and not target.endswith("__init__"):
                targets.add(target)
        graph[module] = targets

    state: dict = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", " -> ".join([*trail, node])
        state[node] = "open"
        for target in sorted(graph[node]):
            visit(target, [*trail, node])
        state[node] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_benchmark_suite_does_not_use_the_command_line():
    """``bench/`` imports the benchmark machinery from ``fastprompt.benchmarks``; only the CLI's own
    tests import ``fastprompt.cli``."""
    for path in sorted((ROOT / "bench").glob("*.py")):
        if path.name == "test_cli.py":
            continue
        imported = list(_imports("bench." + path.stem, path))
        assert not [m for m in imported if m.startswith("fastprompt.cli")], path.name


def test_shared_names_defined_once():
    """The dtype set, the peft type and the config file name each have one definition."""
    from fastprompt.integrations import peft_methods
    from fastprompt.ops import checks
    from fastprompt.prompted_embeds import adapter_files, config, word_embeddings
    from fastprompt.testing import tolerances

    assert word_embeddings.FUSABLE_DTYPES is checks.FLOAT_DTYPES is tolerances.FLOAT_DTYPES
    assert peft_methods.PROMPT_TUNING is config.PROMPT_TUNING
    assert adapter_files.CONFIG_NAME is config.CONFIG_NAME


def test_no_internal_labels_in_the_package():
    """Nothing the package prints or says refers to the project's own issue numbers."""
    import re

    label = re.compile(r"\bissue #?\d+", re.IGNORECASE)
    hits = [
        f"{path.relative_to(ROOT)}:{number}"
        for _, path in _module_files()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if label.search(line)
    ]
    assert not hits, hits

