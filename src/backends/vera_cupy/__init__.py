"""VeRA and DVoRA on CuPy: :mod:`vera_numpy`'s implementation bound to CuPy and a GPU.

The layers, containers, optimisers and schedule are :mod:`vera_numpy`'s own (they are
generic over the array namespace); this module adds only what differs on a GPU:

* :class:`CupyBackend`: the namespace ``array_api_compat.cupy``, a CUDA device, and
  the device <-> host copies, used at file I/O and nowhere else;
* :func:`to_device`: a host weight dictionary copied to the GPU once;
* :func:`generate_projections`, :func:`add_vera`, :func:`load_adapter`: the
  :mod:`vera_numpy` functions with the arrays placed on the GPU (projections are
  generated there, not copied).

The module imports without CuPy; its functions need CuPy (the ``[cupy]`` extra of
vera-core) and a CUDA device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import vera_core as vc
from vera_numpy import AdaptedModel, Backend
from vera_numpy import add_vera as _add_vera


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as error:
        raise ImportError("vera_cupy needs CuPy (the [cupy] extra of vera-core) and a CUDA device") from error
    return cupy


class CupyBackend(Backend):
    """``array_api_compat.cupy`` on one CUDA device (default: the current one)."""

    def __init__(self, device: Any = None) -> None:
        cupy = _cupy()
        import array_api_compat.cupy as xp

        super().__init__(xp, cupy.cuda.Device() if device is None else device)

    def from_host(self, host: Any) -> Any:
        with self.device:
            return _cupy().asarray(host)

    def to_host(self, array: Any) -> np.ndarray:
        return _cupy().asnumpy(array)


def to_device(weights: Mapping[str, Any], device: Any = None) -> dict[str, Any]:
    """The weight dictionary with every host array copied to the GPU (device arrays kept as they are)."""
    backend = CupyBackend(device)
    ndarray = _cupy().ndarray
    return {name: value if isinstance(value, ndarray) else backend.from_host(value) for name, value in weights.items()}


def generate_projections(
    seed: int, r: int, max_in: int, max_out: int, *, dtype: Any = None, device: Any = None
) -> tuple[Any, Any]:
    """:func:`vera_core.generate_projections` on the GPU (bit-identical to every other backend)."""
    backend = CupyBackend(device)
    return vc.generate_projections(seed, r, max_in, max_out, xp=backend.xp, dtype=dtype, device=backend.device)


def add_vera(
    weights: Mapping[str, Any], target_modules: str | Sequence[str], *, device: Any = None, **options: Any
) -> AdaptedModel:
    """:func:`vera_numpy.add_vera` on the GPU: host weights are copied to ``device`` first."""
    return _add_vera(to_device(weights, device), target_modules, backend=CupyBackend(device), **options)


def load_adapter(
    path: str | os.PathLike[str], weights: Mapping[str, Any], *, device: Any = None, **options: Any
) -> AdaptedModel:
    """:meth:`vera_numpy.AdaptedModel.load` on the GPU: host weights are copied to ``device`` first."""
    return AdaptedModel.load(path, to_device(weights, device), backend=CupyBackend(device), **options)


__all__ = ["CupyBackend", "add_vera", "generate_projections", "load_adapter", "to_device"]
