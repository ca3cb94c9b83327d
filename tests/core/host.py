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


def dtypes(*names: str) -> list[Any]:
    """``parametrize`` values naming floating dtypes, each deselected on a backend without it.

    The test takes the dtype itself with ``getattr(xp, name)``; ``tests/conftest.py`` reads
    the ``needs_dtype`` marks at collection.
    """
    import pytest

    return [pytest.param(name, id=name, marks=pytest.mark.needs_dtype(name)) for name in names]
