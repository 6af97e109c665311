"""The package's shape: one direction of imports, one definition of each shared name, one path through
the module layer.

Layers, each importing only itself and those before it: ``fastprompt.kernels`` <- ``fastprompt.ops`` <-
the module layer (``fastprompt.prompted_embeds``, in its own stated order: ``MODULE_LAYER_ORDER``) <-
``prompt_once`` (the prompt run once) <- ``integrations`` and ``serving`` (vLLM; beside each other,
neither imports the other) <- ``testing`` <- ``benchmarks`` <- ``cli``. The benchmark suite in ``bench/``
uses ``fastprompt.benchmarks``, not the command line.

The module layer has one entry point: one module uses ``fused_concat.fused`` and one module uses the
ZeRO-3 gathering helpers. No module imports another's ``_``-prefixed names, and no imports go in a
circle. Each of these checks is a function over module sources, run on the package and, in
``test_the_checks_catch_violations``, on small sources that break each rule.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = {
    "kernels": 0,
    "ops": 1,
    "prompted_embeds": 2,  # the module layer, in its own order (MODULE_LAYER_ORDER)
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
MODULE_LAYER = "fastprompt.prompted_embeds"
# Each module of the module layer imports only those before it (its __init__ re-exports from them all).
MODULE_LAYER_ORDER = (
    "config",
    "adapter_files",
    "prefix_adapter_files",
    "word_embeddings",
    "deepspeed_zero3",
    "prompt_rows",
    "fused_concat",
    "inputs_embeds",
    "embedding",
)
ENTRY_POINT = f"{MODULE_LAYER}.inputs_embeds"
FUSED = f"{MODULE_LAYER}.fused_concat"
ZERO3 = f"{MODULE_LAYER}.deepspeed_zero3"


def _module_files():
    for path in sorted((ROOT / "fastprompt").rglob("*.py")):
        yield "fastprompt." + ".".join(path.relative_to(ROOT / "fastprompt").with_suffix("").parts), path
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        yield "fastprompt.kernels." + ".".join(path.relative_to(ROOT / "kernels").with_suffix("").parts), path


def _package_sources() -> dict[str, str]:
    return {module: path.read_text() for module, path in _module_files()}


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 and parts[1] != "__init__" else ""
    return LAYERS[top]


def _plain(module: str) -> str:
    """``fastprompt.ops.__init__`` -> ``fastprompt.ops``: the name a module is imported by."""
    return module.removesuffix(".__init__")


def _from_target(module: str, node: ast.ImportFrom) -> str:
    """The module a ``from ... import`` statement in ``module`` imports from, as a dotted name."""
    if not node.level:
        return node.module or ""
    package = module.split(".")[:-1]  # fastprompt.ops.__init__ -> fastprompt.ops
    base = ".".join(package[: len(package) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _imports(module: str, source, known=None):
    """The fastprompt modules ``source`` (text or a path) imports, absolute and relative, module-level and
    deferred, as dotted names. ``from package import name`` yields the submodule where ``name`` is one
    (``known``: the plain names of the modules there are; default the package's)."""
    known = {_plain(m) for m, _ in _module_files()} if known is None else known
    text = source.read_text() if isinstance(source, pathlib.Path) else source
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "fastprompt")
        elif isinstance(node, ast.ImportFrom):
            target = _from_target(module, node)
            if target.split(".")[0] != "fastprompt":
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield submodule if submodule in known else target


def _bindings(module: str, tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted fastprompt name an import binds it to (``from .a import b as c``: c: a.b)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fastprompt":
                    local = alias.asname or alias.name.split(".")[0]
                    names[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom):
            target = _from_target(module, node)
            if target.split(".")[0] == "fastprompt":
                for alias in node.names:
                    names[alias.asname or alias.name] = f"{target}.{alias.name}"
    return names


def _dotted(node: ast.AST, bindings: dict[str, str]) -> str | None:
    """The dotted fastprompt name an expression ``a`` / ``a.b.c`` refers to, through the imports."""
    if isinstance(node, ast.Name):
        return bindings.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, bindings)
        return f"{base}.{node.attr}" if base else None
    return None


def _references(sources: dict[str, str]):
    """(module, dotted name) for every fastprompt name a module imports or refers to through an import."""
    for module, text in sources.items():
        tree = ast.parse(text)
        bindings = _bindings(module, tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _from_target(module, node)
                yield from ((module, f"{target}.{a.name}") for a in node.names)
            elif isinstance(node, (ast.Name, ast.Attribute)):
                name = _dotted(node, bindings)
                if name:
                    yield module, name


def users(sources: dict[str, str], owner: str, names) -> set[str]:
    """The modules other than ``owner`` that import, call or pass on any of ``owner``'s ``names``
    (directly, through a module alias, or through a package that re-exports them: that package is one)."""
    wanted = {f"{owner}.{name}" for name in names}
    return {module for module, name in _references(sources) if name in wanted and _plain(module) != owner}


def gathering_helpers(sources: dict[str, str]) -> set[str]:
    """The ZeRO-3 module's helpers that run the op gathered: its public functions that are not ``is_*``
    predicates."""
    tree = ast.parse(sources[ZERO3])
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and not node.name.startswith(("_", "is_"))
    }


def private_imports(sources: dict[str, str]) -> list[str]:
    """``module: name`` for every ``_``-prefixed (not dunder) name a module takes from another module."""
    modules = {_plain(m) for m in sources}
    found = []
    for module, name in _references(sources):
        owner, _, attr = name.rpartition(".")
        private = attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))
        if private and owner in modules and owner != _plain(module):
            found.append(f"{module}: {name}")
    return sorted(set(found))


def order_violations(sources: dict[str, str], package: str, order) -> list[str]:
    """Where a module of ``package`` imports one of its own package that is not stated before it (or the
    package itself, whose __init__ imports them all), or is missing from ``order``."""
    rank = {f"{package}.{name}": i for i, name in enumerate(order)}
    known = {_plain(m) for m in sources}
    found = []
    for module, text in sources.items():
        if not module.startswith(package + ".") or module == f"{package}.__init__":
            continue
        if module not in rank:
            found.append(f"{module} is not in the stated order")
            continue
        for target in _imports(module, text, known):
            inside = target == package or target.startswith(package + ".")
            if inside and target != module and rank.get(target, len(rank)) >= rank[module]:
                found.append(f"{module} imports {target}, not stated before it")
    return found


def import_cycle(sources: dict[str, str]) -> list[str] | None:
    """One circle of imports among ``sources`` (a package's __init__ included), or None."""
    known = {_plain(m) for m in sources}
    graph = {}
    for module, text in sources.items():
        targets = set()
        for target in _imports(module, text, known):
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != _plain(module):
                targets.add(target)
        graph[_plain(module)] = targets
    state: dict = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return None
        if state.get(node) == "open":
            return [*trail[trail.index(node) :], node]
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            cycle = visit(target, [*trail, node])
            if cycle:
                return cycle
        state[node] = "done"
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None


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
    cycle = import_cycle(_package_sources())
    assert cycle is None, " -> ".join(cycle)


def test_one_path_through_the_module_layer():
    """Every prompt source goes through one entry point: the only module that uses ``fused_concat.fused``
    and the only one that uses the ZeRO-3 gathering helpers."""
    sources = _package_sources()
    assert users(sources, FUSED, ["fused"]) == {ENTRY_POINT}
    helpers = gathering_helpers(sources)
    assert helpers, "the ZeRO-3 module has no gathering helper"
    assert users(sources, ZERO3, helpers) == {ENTRY_POINT}


def test_no_private_names_across_modules():
    """What two modules share is a named (public) part of their package."""
    assert private_imports(_package_sources()) == []


def test_the_module_layer_keeps_its_stated_order():
    """The order ``MODULE_LAYER_ORDER`` holds, and the package's docstring states it (a numbered list)."""
    import importlib

    assert order_violations(_package_sources(), MODULE_LAYER, MODULE_LAYER_ORDER) == []
    doc = importlib.import_module(MODULE_LAYER).__doc__
    stated = [f"{number}. ``{name}``" for number, name in enumerate(MODULE_LAYER_ORDER, 1)]
    assert all(line in doc for line in stated), f"the docstring does not list {stated}"


def test_the_checks_catch_violations():
    """Each check above finds what it is for in small sources that break its rule."""
    m = MODULE_LAYER
    fused = {
        FUSED: "def fused(): pass\n",
        ENTRY_POINT: "from .fused_concat import fused\nfused()\n",
        f"{m}.embedding": "from . import fused_concat\nfused_concat.fused()\n",
        f"{m}.__init__": "from .fused_concat import fused\n",
        "fastprompt.serving.prompts": "import fastprompt.prompted_embeds.fused_concat\n"
        "fastprompt.prompted_embeds.fused_concat.fused()\n",
        "fastprompt.integrations.peft_forward": "from ..prompted_embeds.fused_concat import CALLS\n",
    }
    assert users(fused, FUSED, ["fused"]) == {
        ENTRY_POINT,
        f"{m}.embedding",
        f"{m}.__init__",
        "fastprompt.serving.prompts",
    }
    zero3 = {
        ZERO3: "def is_zero3(): pass\ndef _managed(): pass\ndef run_gathered(): pass\n"
        "def gather_more(): pass\n",
        ENTRY_POINT: "from . import deepspeed_zero3\ndeepspeed_zero3.run_gathered()\n",
        f"{m}.prompt_rows": "from .deepspeed_zero3 import gather_more as g\ng()\n",
        f"{m}.embedding": "from .deepspeed_zero3 import is_zero3\n",
    }
    assert gathering_helpers(zero3) == {"run_gathered", "gather_more"}
    assert users(zero3, ZERO3, gathering_helpers(zero3)) == {ENTRY_POINT, f"{m}.prompt_rows"}
    private = {
        "fastprompt.prompt_once.a": "from .b import _rows, public, __version__\n",
        "fastprompt.prompt_once.b": "_rows = public = 1\n_own = _rows\n",
        "fastprompt.prompt_once.c": "from . import b\nb._rows\n",
        "fastprompt.prompt_once.d": "import torch\ntorch._C\n",
    }
    assert private_imports(private) == [
        "fastprompt.prompt_once.a: fastprompt.prompt_once.b._rows",
        "fastprompt.prompt_once.c: fastprompt.prompt_once.b._rows",
    ]
    order = {
        f"{m}.__init__": "from .embedding import PromptEmbedding\n",
        f"{m}.config": "",
        f"{m}.word_embeddings": "from .config import X\n",
        f"{m}.adapter_files": "from .word_embeddings import Y\n",  # stated before word_embeddings
        f"{m}.fused_concat": "from fastprompt.prompted_embeds import CALLS\n",  # the package facade
        f"{m}.unstated": "",
    }
    assert order_violations(order, m, MODULE_LAYER_ORDER) == [
        f"{m}.adapter_files imports {m}.word_embeddings, not stated before it",
        f"{m}.fused_concat imports {m}, not stated before it",
        f"{m}.unstated is not in the stated order",
    ]
    circle = {
        "fastprompt.a.__init__": "from .x import f\n",
        "fastprompt.a.x": "def f():\n    from fastprompt.b import g\n",
        "fastprompt.b": "from fastprompt import a\n",
    }
    assert import_cycle(circle) == ["fastprompt.a", "fastprompt.a.x", "fastprompt.b", "fastprompt.a"]
    del circle["fastprompt.b"]
    assert import_cycle(circle) is None


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
