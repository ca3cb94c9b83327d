"""Shared fixtures: the array backend matrix (``backend``, ``xp``, ``device``) and Hypothesis profiles.

The ``xp`` fixture follows SciPy's: one run of each test per backend of
:data:`vera_core.testing.BACKENDS`, chosen with ``VERA_BACKENDS`` (a comma list;
default all, skipping what is not installed). A backend named in ``VERA_BACKENDS``
that does not import is an error, except the CUDA ones without a GPU.
``HYPOTHESIS_PROFILE`` picks ``ci`` (default: few examples, the same ones every run, no deadline)
or ``thorough`` (many random examples).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import settings

from vera_core.testing import BACKENDS, LoadedBackend, load_backend, selected_backends

settings.register_profile("ci", max_examples=12, deadline=None, print_blob=True, derandomize=True)
settings.register_profile("thorough", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

try:
    SELECTED = dict(selected_backends())
except ValueError as exc:
    raise pytest.UsageError(str(exc)) from exc


@pytest.fixture(scope="session", params=list(SELECTED))
def backend(request: pytest.FixtureRequest) -> LoadedBackend:
    """The backend under test: namespace, device and a second device (or skip, with the reason)."""
    loaded = load_backend(BACKENDS[request.param], explicit=SELECTED[request.param])
    if loaded.skip_reason is not None:
        pytest.skip(f"{request.param}: {loaded.skip_reason}")
    return loaded


@pytest.fixture(scope="session")
def xp(backend: LoadedBackend) -> Any:
    """The Array API namespace under test."""
    return backend.xp


@pytest.fixture(scope="session")
def device(backend: LoadedBackend) -> Any:
    """The device the backend's arrays live on."""
    return backend.device
