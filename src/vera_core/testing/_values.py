"""Moving values between any Array API namespace and Python floats, and comparing them."""

from __future__ import annotations

import math
import struct
from typing import Any

from array_api_compat import array_namespace

FLOAT_NAMES = ("float32", "float64", "float16", "bfloat16")
"""The floating dtypes the checks know; float32 and float64 are the standard's."""

HALF_NAMES = ("float16", "bfloat16")


def supported_floats(xp: Any, device: Any) -> tuple[str, ...]:
    """The names in :data:`FLOAT_NAMES` that ``xp`` can hold and multiply on ``device``."""
    names = []
    for name in FLOAT_NAMES:
        dtype = getattr(xp, name, None)
        if dtype is None:
            continue
        try:
            probe = xp.asarray([[1.0, 2.0]], dtype=dtype, device=device)
            ok = float(xp.matmul(probe, probe.T)[0, 0]) == 5.0
        except Exception:  # a missing dtype or kernel raises anything from TypeError to RuntimeError
            ok = False
        if ok:
            names.append(name)
    return tuple(names)


def eps(xp: Any, name: str) -> float:
    """Machine epsilon of the dtype called ``name``."""
    return float(xp.finfo(getattr(xp, name)).eps)


def to_nested(array: Any) -> Any:
    """The values of ``array`` as nested lists of Python numbers (a number for 0-D arrays)."""
    tolist = getattr(array, "tolist", None)
    if tolist is not None:
        return tolist()
    if array.ndim == 0:
        return float(array) if _is_floating(array) else int(array)
    return [to_nested(array[i, ...]) for i in range(array.shape[0])]


def _is_floating(array: Any) -> bool:
    return bool(array_namespace(array).isdtype(array.dtype, "real floating"))


def flatten(nested: Any) -> list[float]:
    """Every number of a nested list, in row-major order."""
    if isinstance(nested, list):
        return [value for item in nested for value in flatten(item)]
    return [nested]


def absolute(nested: Any) -> Any:
    """``|nested|`` elementwise (None stays None)."""
    if nested is None:
        return None
    if isinstance(nested, list):
        return [absolute(item) for item in nested]
    return abs(nested)


def assert_close(what: str, actual: Any, expected: Any, tolerance: Any) -> None:
    """Raise AssertionError unless ``|actual - expected| <= tolerance`` elementwise.

    ``tolerance`` is a nested list of the same shape, or a number for all elements.
    """
    got, want = flatten(actual), flatten(expected)
    if len(got) != len(want):
        raise AssertionError(f"{what}: {len(got)} values, expected {len(want)}")
    bounds = flatten(tolerance) if isinstance(tolerance, list) else [tolerance] * len(want)
    worst, index = -1.0, -1
    for i, (a, e, t) in enumerate(zip(got, want, bounds, strict=True)):
        excess = abs(a - e) - t if math.isfinite(a) else math.inf
        if excess > 0 and excess > worst:
            worst, index = excess, i
    if index >= 0:
        raise AssertionError(
            f"{what}: element {index} (row-major) is {got[index]!r}, expected {want[index]!r} "
            f"within {bounds[index]:.3g} (error {abs(got[index] - want[index]):.3g})"
        )


def assert_identical(what: str, actual: Any, expected: Any) -> None:
    """Raise AssertionError unless every value is bit for bit the expected one (sign of zero included)."""
    got, want = flatten(actual), flatten(expected)
    if len(got) != len(want):
        raise AssertionError(f"{what}: {len(got)} values, expected {len(want)}")
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        if struct.pack("<d", a) != struct.pack("<d", e):
            raise AssertionError(f"{what}: element {i} (row-major) is {a!r} ({a.hex()}), expected {e!r} ({e.hex()})")
