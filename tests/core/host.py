"""Host copies of backend arrays for the tests that compare with NumPy."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(array: Any) -> np.ndarray:
    """A NumPy copy of a CPU or CUDA array of any tested backend (float16 and wider)."""
    if type(array).__module__.startswith("cupy"):
        return array.get()
    if type(array).__module__.startswith("jax"):  # possibly on a GPU, which DLPack cannot hand to NumPy
        return np.asarray(array)
    if hasattr(array, "cpu"):  # torch, possibly on CUDA
        array = array.cpu()
    return np.from_dlpack(array)


def bits(array: np.ndarray) -> np.ndarray:
    """The bit patterns of a floating array, for bit-for-bit comparison (signed zeros and NaNs included)."""
    return array.view(f"u{array.dtype.itemsize}")


def require_dtype(xp: Any, device: Any, name: str) -> Any:
    """The dtype called ``name`` of ``xp``, skipping the test where ``device`` lacks it."""
    import pytest

    from vera_core.testing._values import supported_floats

    if name not in supported_floats(xp, device):
        pytest.skip(f"no {name} on this device")
    return getattr(xp, name)
