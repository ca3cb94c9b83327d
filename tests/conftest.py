"""Shared fixtures: the array backend matrix (``backend``, ``xp``, ``device``) and Hypothesis profiles.

The ``xp`` fixture follows SciPy's: one run of each test per backend of
:data:`vera_core.testing.BACKENDS`, chosen with ``VERA_BACKENDS`` (a comma list;
default all, skipping what is not installed). A backend named in ``VERA_BACKENDS``
that does not import is an error, except the CUDA ones without a GPU.
``HYPOTHESIS_PROFILE`` picks ``ci`` (default: few examples, the same ones every run, no deadline)
or ``thorough`` (many random examples).

A test that cannot apply to a backend is deselected for it at collection (the backends are
loaded then): markers ``needs_dtype(name)``, ``needs_second_device`` and
``only_backends(*names, why=...)`` say what it needs. A backend that cannot be loaded here
(a CUDA one without a GPU) keeps its tests, which the ``backend`` fixture skips with the reason.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import pytest
from hypothesis import settings

from vera_core.testing import BACKENDS, LoadedBackend, load_backend, selected_backends
from vera_core.testing._values import supported_floats

settings.register_profile("ci", max_examples=12, deadline=None, print_blob=True, derandomize=True)
settings.register_profile("thorough", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

try:
    SELECTED = dict(selected_backends())
except ValueError as exc:
    raise pytest.UsageError(str(exc)) from exc


@functools.cache
def loaded(name: str) -> LoadedBackend:
    """The backend called ``name``, imported once per run."""
    return load_backend(BACKENDS[name], explicit=SELECTED[name])


@functools.cache
def floats(name: str) -> tuple[str, ...]:
    """The floating dtypes the backend called ``name`` supports on its device."""
    return supported_floats(loaded(name).xp, loaded(name).device)


def inapplicable(item: pytest.Item, name: str) -> str | None:
    """Why ``item`` cannot run on the backend called ``name`` (None: it can, or the backend is skipped)."""
    for marker in item.iter_markers("only_backends"):
        if name not in marker.args:
            return f"{name}: {marker.kwargs['why']}"
    backend = loaded(name)
    if backend.skip_reason is not None:
        return None
    for marker in item.iter_markers("needs_dtype"):
        if marker.args[0] not in floats(name):
            return f"{name} has no {marker.args[0]} on {backend.device}"
    if item.get_closest_marker("needs_second_device") is not None and backend.other_device is None:
        return f"{name} has a single device"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that cannot apply to their backend; the root conftest deselects them."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "backend" in callspec.params:
            reason = inapplicable(item, callspec.params["backend"])
            if reason is not None:
                item.add_marker(pytest.mark.cannot_apply(reason))


@pytest.fixture(scope="session", params=list(SELECTED))
def backend(request: pytest.FixtureRequest) -> LoadedBackend:
    """The backend under test: namespace, device and a second device (or skip, with the reason)."""
    loaded_backend = loaded(request.param)
    if loaded_backend.skip_reason is not None:
        pytest.skip(f"{request.param}: {loaded_backend.skip_reason}")
    return loaded_backend


@pytest.fixture(scope="session")
def xp(backend: LoadedBackend) -> Any:
    """The Array API namespace under test."""
    return backend.xp


@pytest.fixture(scope="session")
def device(backend: LoadedBackend) -> Any:
    """The device the backend's arrays live on."""
    return backend.device
