"""The runnable examples of the documentation pages this package owns."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


def python_blocks(page: str) -> str:
    """The page's ```python blocks, joined into one script."""
    return "\n".join(re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.DOTALL))


@pytest.mark.requires("jax")
def test_jax_page_runs(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(python_blocks("jax.md"), "docs/jax.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "jax.grad agrees with vera_backward" in printed and "DVoRA gradients agree" in printed
