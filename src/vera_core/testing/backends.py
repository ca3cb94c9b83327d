"""The registry of array backends the tests run on, each imported only when asked for.

``VERA_BACKENDS`` (a comma list of names) selects backends; without it every backend
in :data:`BACKENDS` is tried and the missing ones are skipped. A backend named
explicitly must import (an error otherwise), except the CUDA ones on a machine
without a GPU, which are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class NoDeviceError(Exception):
    """The backend's library imports but cannot run here (no GPU): skip it."""


class BackendError(RuntimeError):
    """A backend named in ``VERA_BACKENDS`` cannot be imported."""


@dataclass(frozen=True)
class Backend:
    """One library (and device kind) the tests can run on."""

    name: str
    module: str
    """The library's import name (for messages)."""
    load: Callable[[], tuple[Any, Any, Any]]
    """Import lazily and return ``(xp, device, other_device)``; ``other_device`` may be None."""
    needs_gpu: bool = False


@dataclass(frozen=True)
class LoadedBackend:
    """A backend ready to use, or the reason it is skipped."""

    name: str
    xp: Any = None
    device: Any = None
    other_device: Any = None
    """A second device of ``xp`` for the mixed-device checks (None when there is none)."""
    skip_reason: str | None = None


def _default_device(xp: Any) -> Any:
    return xp.__array_namespace_info__().default_device()


def _load_numpy() -> tuple[Any, Any, Any]:
    import array_api_compat.numpy
    import numpy

    # NumPy 2 is an Array API namespace itself; 1.x needs the compatibility layer.
    xp = numpy if hasattr(numpy, "__array_namespace_info__") else array_api_compat.numpy
    return xp, _default_device(xp), None


def _load_strict() -> tuple[Any, Any, Any]:
    import array_api_strict

    return array_api_strict, _default_device(array_api_strict), array_api_strict.Device("device1")


def _load_torch() -> tuple[Any, Any, Any]:
    import array_api_compat.torch as xp
    import torch

    return xp, torch.device("cpu"), torch.device("meta")


def _load_torch_cuda() -> tuple[Any, Any, Any]:
    import array_api_compat.torch as xp
    import torch

    if not torch.cuda.is_available():
        raise NoDeviceError("no CUDA device (torch.cuda.is_available() is False)")
    # An indexed device: arrays report "cuda:0", which does not compare equal to "cuda".
    return xp, torch.device("cuda", torch.cuda.current_device()), torch.device("cpu")


def _load_cupy() -> tuple[Any, Any, Any]:
    import array_api_compat.cupy as xp
    import cupy

    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise NoDeviceError(f"no CUDA device ({exc})") from exc
    if count == 0:
        raise NoDeviceError("no CUDA device")
    return xp, cupy.cuda.Device(0), cupy.cuda.Device(1) if count > 1 else None


def _load_jax() -> tuple[Any, Any, Any]:
    import jax

    jax.config.update("jax_enable_x64", True)
    # on GPUs JAX's default float32 products use TensorFloat-32 (10-bit mantissas); the
    # checks compare at float32 precision, as users who need it set it
    jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as xp

    devices = jax.devices()
    return xp, devices[0], devices[1] if len(devices) > 1 else None


BACKENDS: Mapping[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("numpy", "numpy", _load_numpy),
        Backend("array_api_strict", "array_api_strict", _load_strict),
        Backend("torch", "torch", _load_torch),
        Backend("torch-cuda", "torch", _load_torch_cuda, needs_gpu=True),
        Backend("cupy", "cupy", _load_cupy, needs_gpu=True),
        Backend("jax", "jax", _load_jax),
    )
}
"""Every backend the tests know, by name. JAX runs with ``jax_enable_x64`` (so float64 is checked)
and ``jax_default_matmul_precision="highest"`` (so float32 products are float32 on GPUs too)."""


def _nvidia_gpu_present() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def selected_backends(environ: Mapping[str, str] | None = None) -> list[tuple[str, bool]]:
    """``(name, explicit)`` for each backend to run: those in ``VERA_BACKENDS``, else all.

    Raises ValueError for a name that is not in :data:`BACKENDS`.

    Examples
    --------
    >>> selected_backends({"VERA_BACKENDS": "numpy, torch"})
    [('numpy', True), ('torch', True)]
    >>> len(selected_backends({})) == len(BACKENDS)
    True
    """
    environ = os.environ if environ is None else environ
    names = [name.strip() for name in environ.get("VERA_BACKENDS", "").split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise ValueError(f"VERA_BACKENDS names unknown backends {unknown}; known: {', '.join(BACKENDS)}")
    return [(name, True) for name in names] if names else [(name, False) for name in BACKENDS]


def load_backend(backend: Backend, *, explicit: bool = False) -> LoadedBackend:
    """Import ``backend``, or say why it is skipped.

    Raises
    ------
    BackendError
        When ``explicit`` and the library does not import (a CUDA backend on a machine
        without a GPU is skipped instead).

    Examples
    --------
    >>> loaded = load_backend(BACKENDS["array_api_strict"])
    >>> loaded.xp.__name__, loaded.skip_reason
    ('array_api_strict', None)
    """
    try:
        xp, device, other_device = backend.load()
    except NoDeviceError as exc:
        return LoadedBackend(backend.name, skip_reason=str(exc))
    except ImportError as exc:
        if backend.needs_gpu and not _nvidia_gpu_present():
            return LoadedBackend(backend.name, skip_reason=f"no CUDA device ({backend.module} is not installed either)")
        if explicit:
            raise BackendError(f"VERA_BACKENDS names {backend.name!r} but it does not import: {exc}") from exc
        return LoadedBackend(backend.name, skip_reason=f"{backend.module} is not installed ({exc})")
    return LoadedBackend(backend.name, xp, device, other_device)
