"""The array-backend tests run on the shared backend matrix (``VERA_BACKENDS``), limited to
the namespaces whose arrays ``vera_numpy`` can update in place."""

from __future__ import annotations

from typing import Any

import pytest

from vera_core.testing import LoadedBackend

MUTABLE_NAMESPACES = ("numpy", "array_api_strict", "cupy")


@pytest.fixture
def xp(backend: LoadedBackend) -> Any:
    """The namespace under test, when ``vera_numpy`` supports it."""
    if backend.name not in MUTABLE_NAMESPACES:
        pytest.skip(f"{backend.name}: vera_numpy needs mutable arrays ({', '.join(MUTABLE_NAMESPACES)})")
    return backend.xp
