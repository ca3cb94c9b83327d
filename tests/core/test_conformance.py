"""The conformance suite itself: it passes on every backend, catches broken ones, and selects backends."""

from __future__ import annotations

from typing import Any

import pytest

from vera_core import _lowrank
from vera_core.testing import (
    BACKENDS,
    Backend,
    BackendError,
    LoadedBackend,
    check_adapters,
    check_namespace,
    check_projections,
    load_backend,
    selected_backends,
)
from vera_core.testing import backends as registry


def test_check_namespace(backend: LoadedBackend) -> None:
    check_namespace(backend.xp, backend.device, other_device=backend.other_device)


@pytest.mark.requires("array_api_strict")
def test_check_namespace_on_a_device_without_float64() -> None:
    import array_api_strict as strict

    check_namespace(strict, strict.Device("no_float64"))


class _ShiftedArange:
    """array-api-strict with an ``arange`` that starts one too late (a broken counter)."""

    def __init__(self, xp: Any) -> None:
        self._xp = xp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._xp, name)

    def arange(self, start: int, stop: int, **kwargs: Any) -> Any:
        return self._xp.arange(start + 1, stop + 1, **kwargs)


@pytest.mark.requires("array_api_strict")
def test_broken_counters_are_caught() -> None:
    import array_api_strict as strict

    with pytest.raises(AssertionError, match="for seed"):
        check_projections(_ShiftedArange(strict))


@pytest.mark.requires("array_api_strict")
def test_broken_adapter_arithmetic_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    import array_api_strict as strict

    fold = _lowrank.fold
    monkeypatch.setattr(_lowrank, "fold", lambda xp, B, d, b: fold(xp, B, d, b) * (1 + 2**-16))
    with pytest.raises(AssertionError, match="vera_forward"):
        check_adapters(strict)


def test_selection_from_the_environment() -> None:
    assert selected_backends({"VERA_BACKENDS": " jax,numpy "}) == [("jax", True), ("numpy", True)]
    assert selected_backends({"VERA_BACKENDS": ""}) == [(name, False) for name in BACKENDS]
    with pytest.raises(ValueError, match="unknown backends"):
        selected_backends({"VERA_BACKENDS": "numpy,tensorflow"})


def _missing() -> Any:
    raise ImportError("No module named 'nothing'")


def _no_device() -> Any:
    raise registry.NoDeviceError("no CUDA device")


@pytest.mark.parametrize("gpu_present", [False, True])
@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("needs_gpu", [False, True])
def test_missing_library(monkeypatch: pytest.MonkeyPatch, needs_gpu: bool, explicit: bool, gpu_present: bool) -> None:
    monkeypatch.setattr(registry, "_nvidia_gpu_present", lambda: gpu_present)
    backend = Backend("fake", "nothing", _missing, needs_gpu=needs_gpu)
    if explicit and (gpu_present or not needs_gpu):
        with pytest.raises(BackendError, match="VERA_BACKENDS names 'fake'"):
            load_backend(backend, explicit=explicit)
        return
    reason = load_backend(backend, explicit=explicit).skip_reason
    assert reason is not None and (
        "no CUDA device" in reason if needs_gpu and not gpu_present else "not installed" in reason
    )


@pytest.mark.parametrize("explicit", [False, True])
def test_gpu_backend_without_a_device_is_skipped(explicit: bool) -> None:
    loaded = load_backend(Backend("fake-cuda", "fake", _no_device, needs_gpu=True), explicit=explicit)
    assert loaded.skip_reason == "no CUDA device"
