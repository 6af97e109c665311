"""README's offline serving example runs as written, with the placeholder paths pointing at the test
model and adapters."""

from __future__ import annotations

import pathlib
import re

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the serving tests run in the vLLM venv)")

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_offline_example_runs(base_dir, adapter_dirs, tmp_path, capsys):
    text = README.read_text()
    start = text.index("## Serving with vLLM")
    block = re.compile(r"```python\n(.*?)```", re.S).search(text, start).group(1)
    paths = {
        "path/to/base-model": base_dir,
        "path/to/peft-adapter-a": adapter_dirs["alpha"],
        "path/to/peft-adapter-b": adapter_dirs["beta"],
        "path/to/new-adapter": adapter_dirs["gamma"],
    }
    for placeholder, path in paths.items():
        assert f'"{placeholder}"' in block, placeholder
        block = block.replace(f'"{placeholder}"', repr(path))
    namespace = {"__name__": "__main__"}
    exec(compile(block, "README.md: Serving with vLLM", "exec"), namespace)
    llm = namespace["llm"]
    try:
        assert llm.adapter_names == ["sentiment"]  # translate deleted, sentiment replaced
        assert len(namespace["outputs"]) == 3 and "[" in capsys.readouterr().out
    finally:
        llm.shutdown()
