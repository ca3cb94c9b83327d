"""Importing the core (and its conformance suite) imports no array library."""

from __future__ import annotations

import subprocess
import sys

import pytest

LIBRARIES = ("numpy", "torch", "jax", "jaxlib", "cupy", "array_api_strict")


@pytest.mark.parametrize("module", ["vera_core", "vera_core.testing"])
def test_import_loads_no_array_library(module: str) -> None:
    code = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({LIBRARIES!r})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
