"""The README's examples run as written (each selected ```python block, in a fresh namespace)."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
RUNNABLE = (
    "### Without PEFT: `PromptEmbedding.prepend`",
    "### Several prompt-tuning adapters in one batch",
)


def _block(heading: str) -> str:
    text = README.read_text()
    start = text.index(heading)
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


@pytest.mark.parametrize("heading", RUNNABLE)
def test_readme_example_runs(heading):
    exec(compile(_block(heading), f"README.md: {heading}", "exec"), {"__name__": "readme"})
