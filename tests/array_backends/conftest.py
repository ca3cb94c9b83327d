"""Fixtures for the array-backend tests: one run per namespace (NumPy, array-api-strict, CuPy)."""

from __future__ import annotations

from typing import Any

import pytest

from .array_backend_helpers import namespace


@pytest.fixture(params=["numpy", "array_api_strict", "cupy"])
def xp(request: pytest.FixtureRequest) -> Any:
    """Each array namespace the backend must run on."""
    return namespace(request.param)
