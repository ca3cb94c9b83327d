"""docs/torch.md's examples run and print what the page says."""

import re
from pathlib import Path

import pytest

pytest.importorskip("torch")

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_torch_page_runs(capsys):
    text = (DOCS / "torch.md").read_text()
    script = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL))
    exec(compile(script, "docs/torch.md", "exec"), {})
    printed = capsys.readouterr().out
    for expected in re.findall(r"^# (trainable params: .*)$", script, flags=re.MULTILINE):
        assert expected in printed
