"""The array-backend tests run on the shared backend matrix (``VERA_BACKENDS``), limited to
the namespaces whose arrays ``vera_numpy`` can update in place: on the others they are
deselected at collection (``tests/conftest.py``)."""

from __future__ import annotations

import pytest

MUTABLE_NAMESPACES = ("numpy", "array_api_strict", "cupy")


def pytest_itemcollected(item: pytest.Item) -> None:
    """Every test here that takes ``xp`` runs ``vera_numpy`` on it."""
    if "xp" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.only_backends(*MUTABLE_NAMESPACES, why="vera_numpy needs mutable arrays"))
