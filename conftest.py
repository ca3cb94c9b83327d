"""Collection rules for the whole repository (doctests of optional parts included)."""

from __future__ import annotations

import importlib.util

# Modules whose import needs an optional package: their doctests are collected only
# where it is installed (each nox session installs one array backend).
_NEEDS = {
    "src/backends/vera_torch": "torch",
    "src/vera_cli/demo/torch_engine.py": "torch",
    "src/vera_core/testing": "array_api_strict",
}

collect_ignore = [path for path, package in _NEEDS.items() if importlib.util.find_spec(package) is None]
