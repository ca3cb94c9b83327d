"""Conformance checks of the word arithmetic, Threefry-2x32-20 and the projection stream."""

from __future__ import annotations

import random
from typing import Any

from array_api_compat import device as device_of

from vera_core import projections
from vera_core._words import WordOps
from vera_core.testing import spec
from vera_core.testing._values import assert_identical, flatten, supported_floats, to_nested
from vera_core.threefry import threefry2x32

SEEDS = (0, 2**64 - 1, 0x0123456789ABCDEF)
"""Seeds the projection checks use: both halves of the root key zero, all ones, and mixed."""


def _sample_counters(count: int, rng: random.Random) -> list[tuple[int, int]]:
    edges = [(0, 0), (spec.WORD - 1, spec.WORD - 1), (spec.WORD - 1, 0), (0, spec.WORD - 1)]
    return edges + [(rng.randrange(spec.WORD), rng.randrange(spec.WORD)) for _ in range(count - len(edges))]


def check_threefry(xp: Any, device: Any = None) -> None:
    """Threefry-2x32-20 on ``xp`` matches the Random123 vectors and the pure-Python oracle.

    Both word representations run: the one :class:`vera_core._words.WordOps` picks for
    ``xp`` (``uint32`` where it wraps) and the masked ``int64`` one.

    Parameters
    ----------
    xp : namespace
        The Array API namespace under test.
    device : device, optional
        Where to put the counters; default the namespace's default device.

    Raises
    ------
    AssertionError
        Naming the representation, key and counter of the first wrong word.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> check_threefry(xp)
    """
    rng = random.Random(2011)
    keys = [answer[1] for answer in spec.KNOWN_ANSWERS] + [(rng.randrange(spec.WORD), rng.randrange(spec.WORD))]
    counters = _sample_counters(64, rng)
    for force_int64 in (False, True):
        ops = WordOps(xp, device, force_int64=force_int64)
        label = "masked int64 words" if ops.masked else "uint32 words"
        for counter, key, output in spec.KNOWN_ANSWERS:
            got = threefry2x32(key, ops.asarray([counter[0]]), ops.asarray([counter[1]]), ops)
            words = tuple(int(word[0]) for word in got)
            if words != output:
                raise AssertionError(
                    f"threefry2x32 ({label}) of counter {counter} under key {key}: "
                    f"{tuple(map(hex, words))}, Random123 says {tuple(map(hex, output))}"
                )
        x0 = ops.asarray([c[0] for c in counters])
        x1 = ops.asarray([c[1] for c in counters])
        for key in keys:
            y0, y1 = threefry2x32(key, x0, x1, ops)
            for got0, got1, counter in zip(to_nested(y0), to_nested(y1), counters, strict=True):
                if (got0, got1) != spec.threefry2x32_20(key, counter):
                    raise AssertionError(
                        f"threefry2x32 ({label}) of counter {counter} under key {key}: {(hex(got0), hex(got1))}, "
                        f"the specification gives {tuple(map(hex, spec.threefry2x32_20(key, counter)))}"
                    )


def check_projections(xp: Any, device: Any = None) -> None:
    """:func:`vera_core.generate_projections` is bit for bit the specified stream, on ``device``.

    Every floating dtype ``xp`` supports on ``device`` is checked against the pure-Python
    reimplementation of ``docs/projection-spec.md`` for several seeds, including a matrix
    generated in several blocks.

    Parameters
    ----------
    xp : namespace
        The Array API namespace under test.
    device : device, optional
        Where to generate; default the namespace's default device.

    Raises
    ------
    AssertionError
        Naming the dtype, seed, matrix and element that differ.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> check_projections(xp)
    """
    for name in supported_floats(xp, device):
        dtype = getattr(xp, name)
        for seed in SEEDS:
            A, B = projections.generate_projections(seed, r=3, max_in=5, max_out=4, xp=xp, dtype=dtype, device=device)
            want_A, want_B = spec.projections(seed, 3, 5, 4, name)
            for label, array, want in (("A", A, want_A), ("B", B, want_B)):
                what = f"{name} {label} for seed {seed:#x}"
                if array.dtype != dtype or tuple(array.shape) != (len(want), len(want[0])):
                    raise AssertionError(f"{what}: dtype {array.dtype} shape {tuple(array.shape)}")
                if device is not None and device_of(array) != device:
                    raise AssertionError(f"{what}: generated on {device_of(array)}, asked for {device}")
                assert_identical(what, to_nested(array), want)
        _check_blocks(xp, device, name)


def _check_blocks(xp: Any, device: Any, name: str) -> None:
    """A matrix generated in three CPU blocks matches the specification at the block edges."""
    r = 3
    per_block = projections._CPU_CHUNK // r
    max_out = 2 * per_block + 1
    _, B = projections.generate_projections(
        1, r=r, max_in=1, max_out=max_out, xp=xp, dtype=getattr(xp, name), device=device
    )
    for row in (0, per_block - 1, per_block, 2 * per_block - 1, 2 * per_block):
        want = [spec.element(1, 1, row, j, r, name) for j in range(r)]
        assert_identical(f"{name} B row {row} of {max_out}", flatten(to_nested(B[row, :])), want)
