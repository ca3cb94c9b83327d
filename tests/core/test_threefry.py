"""Threefry-2x32-20 against the Random123 known answers and against JAX, in both word representations."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from vera_core._words import WordOps
from vera_core.testing import spec
from vera_core.testing._values import to_nested
from vera_core.threefry import threefry2x32

REPRESENTATIONS = pytest.mark.parametrize("force_int64", [False, True], ids=["default-words", "int64-words"])


@REPRESENTATIONS
@pytest.mark.parametrize(("counter", "key", "expected"), spec.KNOWN_ANSWERS, ids=["zeros", "ones", "pi"])
def test_random123_known_answers(
    xp: Any, device: Any, force_int64: bool, counter: tuple[int, int], key: tuple[int, int], expected: tuple[int, int]
) -> None:
    ops = WordOps(xp, device, force_int64=force_int64)
    y0, y1 = threefry2x32(key, ops.asarray([counter[0]]), ops.asarray([counter[1]]), ops)
    assert (int(y0[0]), int(y1[0])) == expected


def _jax_threefry() -> Any:
    """JAX's raw Threefry-2x32 hash: ``(key (2,) uint32, count uint32) -> uint32`` of count's shape."""
    import jax.extend.random

    return jax.extend.random.threefry_2x32


@REPRESENTATIONS
@pytest.mark.requires("jax")  # JAX is the independent Threefry oracle
def test_bit_identical_to_jax(xp: Any, device: Any, force_int64: bool) -> None:
    threefry_2x32 = _jax_threefry()
    import jax.numpy as jnp

    rng = np.random.default_rng(20240101)
    keys = rng.integers(0, 2**32, size=(16, 2), dtype=np.uint64).astype(np.uint32)
    counters = rng.integers(0, 2**32, size=(2, 512), dtype=np.uint64).astype(np.uint32)
    ops = WordOps(xp, device, force_int64=force_int64)
    x0, x1 = ops.asarray(counters[0].tolist()), ops.asarray(counters[1].tolist())
    for key in keys:
        # JAX splits an even-length count into halves (x0, x1) and returns (y0, y1) concatenated.
        expected = np.asarray(threefry_2x32(jnp.asarray(key), jnp.asarray(counters.ravel())))
        y0, y1 = threefry2x32((int(key[0]), int(key[1])), x0, x1, ops)
        got = np.asarray(to_nested(y0) + to_nested(y1), dtype=np.uint32)
        np.testing.assert_array_equal(got, expected, err_msg=f"key {key}")
