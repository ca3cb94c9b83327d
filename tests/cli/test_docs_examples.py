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


def section_blocks(page: str, heading: str) -> str:
    """The ```python blocks of one section (from ``heading`` to the next heading of its level)."""
    text = (DOCS / page).read_text()
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ")[0]
    end = text.find(f"\n{level} ", start + len(heading) + 2)
    return "\n".join(re.findall(r"```python\n(.*?)```", text[start : None if end < 0 else end], flags=re.DOTALL))


def test_bank_section_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes an adapter file
    namespace: dict[str, object] = {}
    code = section_blocks("numpy-cupy.md", "## Many adapters: the bank")
    exec(compile(code, "docs/numpy-cupy.md", "exec"), namespace)
    bank, merged = namespace["bank"], namespace["merged"]
    assert bank.adapters() == ["alice", "bob"] and (tmp_path / "bob.safetensors").exists()  # type: ignore[attr-defined]
    assert sorted(merged) == sorted(namespace["weights"])  # type: ignore[call-overload]
