"""Helpers shared by the array-backend tests (host conversion, finite differences)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest


def cupy_or_skip() -> Any:
    """The ``cupy`` module, or skip the test when no CUDA device can be used."""
    try:
        import cupy
    except ImportError:
        pytest.skip("no CUDA device (CuPy is not installed)")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # CUDA driver missing: CuPy raises its own runtime error types
        count = 0
    if count == 0:
        pytest.skip("no CUDA device")
    return cupy


def to_numpy(array: Any) -> np.ndarray:
    """A host copy of an array of any tested namespace."""
    if hasattr(array, "get") and type(array).__module__.startswith("cupy"):
        return array.get()
    return np.asarray(array)


def from_numpy(xp: Any, array: Any) -> Any:
    """``array`` (host) in namespace ``xp``, on its default device."""
    if "cupy" in xp.__name__:
        import cupy

        return cupy.asarray(array)
    return xp.asarray(np.asarray(array))


def numerical_grad(loss: Any, array: Any, xp: Any, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of ``loss()`` with respect to every element of ``array`` (float64)."""
    base = to_numpy(array).copy()
    grad = np.zeros_like(base)
    for index in np.ndindex(base.shape):
        values = []
        for sign in (1.0, -1.0):
            shifted = base.copy()
            shifted[index] += sign * eps
            array[...] = from_numpy(xp, shifted)
            values.append(float(loss()))
        grad[index] = (values[0] - values[1]) / (2 * eps)
    array[...] = from_numpy(xp, base)
    return grad


def weight_dict(xp: Any, seed: int = 0, fan_in_fan_out: bool = False) -> dict[str, Any]:
    """A three-layer model: (out, in) = (7, 5), (6, 7), (3, 6), with biases; plus a 1-D norm weight."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, (out_f, in_f) in {"enc.0.fc": (7, 5), "enc.1.fc": (6, 7), "head": (3, 6)}.items():
        shape = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
        weights[f"{name}.weight"] = from_numpy(xp, rng.standard_normal(shape))
        weights[f"{name}.bias"] = from_numpy(xp, rng.standard_normal(out_f))
    weights["norm.weight"] = from_numpy(xp, np.ones(6))
    return weights


def train_a_little(xp: Any, model: Any, seed: int = 1) -> None:
    """Set every parameter to random values (a stand-in for training)."""
    rng = np.random.default_rng(seed)
    model.load_parameters(
        {name: from_numpy(xp, rng.uniform(0.5, 1.5, p.shape)) for name, p in model.parameters().items()}
    )


def read_tensors(path: Any) -> tuple[Any, dict[str, Any]]:
    """The config and every tensor (projections included when stored) of a verified adapter file."""
    from vera_core.loading import read_adapter

    adapter = read_adapter(path)
    return adapter.config, adapter.tensors()
