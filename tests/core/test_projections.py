"""The shared projections: bit-identical everywhere, Kaiming-uniform, sliced consistently, on the asked device."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from array_api_compat import device as device_of

from vera_core import generate_projections, projections
from vera_core.testing import LoadedBackend
from vera_core.testing._values import HALF_NAMES

from .host import bits, dtypes, to_numpy


@pytest.mark.parametrize("dtype", dtypes("float32", "float64"))
def test_bit_identical_to_numpy(xp: Any, device: Any, dtype: str) -> None:
    sizes = {"r": 48, "max_in": 700, "max_out": 300}
    got = generate_projections(5, **sizes, xp=xp, dtype=getattr(xp, dtype), device=device)
    want = generate_projections(5, **sizes, xp=np, dtype=np.dtype(dtype))
    for name, array, expected in zip("AB", got, want, strict=True):
        assert device_of(array) == device, name
        np.testing.assert_array_equal(bits(to_numpy(array)), bits(expected), err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_kaiming_uniform_range_and_moments(dtype: Any) -> None:
    A, B = generate_projections(11, r=256, max_in=4096, max_out=512, xp=np, dtype=dtype)
    for name, values, fan_in in (("A", A, 4096), ("B", B, 256)):
        bound = dtype(math.sqrt(6.0 / fan_in))  # rounded to the dtype, as the docstring says
        assert values.min() >= -bound and values.max() < bound, name
        n, wide = values.size, values.astype(np.float64)
        # Uniform on [-b, b): mean 0 (sd b / sqrt(3 n)), E[v^2] = b^2 / 3 (sd b^2 sqrt(4 / 45) / sqrt(n)); 6 sigma.
        b = float(bound)
        assert abs(wide.mean()) <= 6 * b / math.sqrt(3 * n), name
        assert abs((wide**2).mean() - b**2 / 3) <= 6 * b**2 * math.sqrt(4 / 45) / math.sqrt(n), name


@pytest.mark.parametrize(
    ("small", "large", "shared"),
    [((8, 64, 32), (16, 64, 32), "A"), ((8, 64, 32), (8, 64, 48), "B")],
    ids=["A-more-rows-same-max_in", "B-more-rows-same-rank"],
)
def test_common_block_of_matrices_with_the_same_fan_in(
    xp: Any, device: Any, small: tuple[int, int, int], large: tuple[int, int, int], shared: str
) -> None:
    got_small = dict(zip("AB", generate_projections(3, *small, xp=xp, device=device), strict=True))
    got_large = dict(zip("AB", generate_projections(3, *large, xp=xp, device=device), strict=True))
    block = to_numpy(got_small[shared])
    rows, cols = block.shape
    np.testing.assert_array_equal(bits(to_numpy(got_large[shared])[:rows, :cols]), bits(block))


def test_block_size_does_not_change_values(xp: Any, device: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    want = [to_numpy(m) for m in generate_projections(9, r=4, max_in=20, max_out=10, xp=xp, device=device)]
    monkeypatch.setattr(projections, "_CPU_CHUNK", 7)
    monkeypatch.setattr(projections, "_ACCELERATOR_CHUNK", 7)
    got = [to_numpy(m) for m in generate_projections(9, r=4, max_in=20, max_out=10, xp=xp, device=device)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(bits(g), bits(w))


@pytest.mark.parametrize("half", dtypes(*HALF_NAMES))
def test_half_dtypes_are_float32_rounded(xp: Any, device: Any, half: str) -> None:
    dtype = getattr(xp, half)
    single = generate_projections(2, r=16, max_in=40, max_out=24, xp=xp, device=device)
    narrow = generate_projections(2, r=16, max_in=40, max_out=24, xp=xp, dtype=dtype, device=device)
    for s, h in zip(single, narrow, strict=True):
        assert h.dtype == dtype
        assert bool(xp.all(xp.astype(s, dtype) == h))


def test_default_dtype_is_float32(xp: Any, device: Any) -> None:
    A, B = generate_projections(0, r=2, max_in=3, max_out=4, xp=xp, device=device)
    assert A.dtype == xp.float32 and B.dtype == xp.float32


@pytest.mark.needs_second_device
def test_generated_on_the_requested_device(backend: LoadedBackend) -> None:
    A, B = generate_projections(0, r=2, max_in=3, max_out=4, xp=backend.xp, device=backend.other_device)
    assert device_of(A) == backend.other_device and device_of(B) == backend.other_device
