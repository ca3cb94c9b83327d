"""docs/peft-interop.md's examples run and agree with PEFT."""

import re
import warnings
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_peft_interop_page_runs():
    text = (DOCS / "peft-interop.md").read_text()
    script = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(script, "docs/peft-interop.md", "exec"), {})
