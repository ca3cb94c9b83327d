"""The shared frozen projections A (r x max_in) and B (max_out x r), regenerated from a seed.

The stream layout is a versioned specification (``docs/projection-spec.md``):

1. ``seed`` is an integer in ``[0, 2**64)``; the root key is
   ``(seed mod 2**32, seed // 2**32)``.
2. Matrix ``m`` (``MATRIX_A = 0``, ``MATRIX_B = 1``) has the key
   ``threefry2x32(root key, (m, 0))``.
3. Element ``(i, j)`` of matrix ``m`` is drawn from the words
   ``(w0, w1) = threefry2x32(key_m, (j, i))``.
4. float32: ``k = w0 >> 8`` (24 bits); float64: ``k = (w0 >> 5) * 2**26 + (w1 >> 6)``
   (53 bits). With ``p`` the number of bits, the value is
   ``(k - 2**(p-1)) * (bound * 2**(1-p))``, in ``[-bound, bound)``, with
   ``bound = sqrt(6 / fan_in)`` rounded to the dtype (A: ``fan_in = max_in``;
   B: ``fan_in = r``). Every step is exact except the single final product, which
   every conforming library rounds correctly: the matrices are bit-identical on every
   backend and device. Narrower dtypes are the float32 values rounded to nearest.

So the integer ``k`` of an element depends only on (seed, matrix, row, column); a
larger or smaller matrix with the same fan_in agrees exactly on the common block.
"""

from __future__ import annotations

import math
from typing import Any

from vera_core._validation import check_namespace, check_positive_int, check_real_float_dtype
from vera_core._words import MASK32, WordOps
from vera_core.threefry import threefry2x32

PRNG_ID = "threefry2x32-20"
"""Identifier of the generator, stored in every adapter file."""

PRNG_VERSION = 1
"""Version of the stream layout above, stored in every adapter file."""

MATRIX_A = 0
MATRIX_B = 1

_CPU_CHUNK = 1 << 16
"""Elements per generation block on a CPU (fits the cache; tuned in benchmarks/)."""

_ACCELERATOR_CHUNK = 1 << 24
"""Elements per generation block elsewhere (fewer kernel launches)."""


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")


def matrix_key(seed: int, matrix: int) -> tuple[int, int]:
    """The Threefry key of one shared matrix (step 2 of the layout).

    Examples
    --------
    >>> matrix_key(0, MATRIX_A) != matrix_key(0, MATRIX_B)
    True
    """
    _check_seed(seed)
    root = (seed & MASK32, seed >> 32)
    return threefry2x32(root, matrix, 0, WordOps.python_ints())


def kaiming_bound(fan_in: int) -> float:
    """PEFT's Kaiming-uniform bound ``sqrt(6 / fan_in)``.

    Examples
    --------
    >>> kaiming_bound(6)
    1.0
    """
    check_positive_int("fan_in", fan_in)
    return math.sqrt(6.0 / fan_in)


def _is_cpu(device: Any) -> bool:
    return device is None or "cpu" in str(device).lower()


def _element_values(ops: WordOps, key: tuple[int, int], rows: range, cols: int, bound: Any, float64: bool) -> Any:
    xp = ops.xp
    column = xp.reshape(ops.arange(0, cols), (1, cols))
    row = xp.reshape(ops.arange(rows.start, rows.stop), (len(rows), 1))
    w0, w1 = threefry2x32(key, column, row, ops)
    if float64:
        high = xp.astype(w0 >> 5, xp.float64)
        low = xp.astype(w1 >> 6, xp.float64)
        signed = (high * float(2**26) + low) - float(2**52)
    else:
        signed = xp.astype(ops.high_bits(w0, 24), xp.float32) - float(2**23)
    return signed * bound


def kaiming_uniform(
    seed: int,
    matrix: int,
    shape: tuple[int, int],
    fan_in: int,
    *,
    xp: Any,
    dtype: Any = None,
    device: Any = None,
) -> Any:
    """One shared matrix, Kaiming-uniform in ``[-sqrt(6/fan_in), sqrt(6/fan_in))``.

    Parameters
    ----------
    seed : int
        Integer in ``[0, 2**64)``.
    matrix : int
        ``MATRIX_A`` or ``MATRIX_B``.
    shape : tuple of int
        ``(rows, columns)``, each in ``[1, 2**32)``.
    fan_in : int
        The fan-in that sets the bound.
    xp : namespace
        The Array API namespace to generate with.
    dtype : dtype, optional
        A real floating dtype of ``xp``; default float32. float64 draws 53 bits;
        other dtypes are the float32 values cast.
    device : device, optional
        Where to generate; default the namespace's default device.

    Returns
    -------
    array
        The matrix, on ``device``.

    Examples
    --------
    >>> import numpy as xp
    >>> A = kaiming_uniform(0, MATRIX_A, (2, 3), 3, xp=xp)
    >>> A.shape, A.dtype == xp.float32
    ((2, 3), True)
    """
    _check_seed(seed)
    check_namespace(xp)
    if not isinstance(matrix, int) or isinstance(matrix, bool) or matrix not in (MATRIX_A, MATRIX_B):
        raise ValueError(f"matrix must be MATRIX_A (0) or MATRIX_B (1), got {matrix!r}")
    if not isinstance(shape, tuple | list) or len(shape) != 2:
        raise TypeError(f"shape must be a pair (rows, columns), got {shape!r}")
    rows, cols = shape
    for name, size in (("rows", rows), ("columns", cols)):
        check_positive_int(name, size)
        if size > MASK32:
            raise ValueError(f"{name} must be below 2**32, got {size}")
    dtype = xp.float32 if dtype is None else dtype
    check_real_float_dtype(xp, dtype, "dtype")
    float64 = dtype == xp.float64
    draw_dtype = xp.float64 if float64 else xp.float32
    bits = 53 if float64 else 24
    bound_value = kaiming_bound(fan_in)
    try:
        bound = xp.asarray(bound_value, dtype=draw_dtype, device=device)
    except (TypeError, ValueError) as error:  # the namespace's own words for a device it does not know
        raise ValueError(f"device {device!r} is not a device of this namespace: {error}") from None
    step = bound * float(2.0 ** (1 - bits))  # exact: a power-of-two scaling

    ops = WordOps(xp, device)
    key = matrix_key(seed, matrix)
    chunk = _CPU_CHUNK if _is_cpu(device) else _ACCELERATOR_CHUNK
    rows_per_block = max(1, chunk // cols)
    blocks = [
        _element_values(ops, key, range(start, min(start + rows_per_block, rows)), cols, step, float64)
        for start in range(0, rows, rows_per_block)
    ]
    values = blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=0)
    return values if dtype == draw_dtype else xp.astype(values, dtype)


def generate_projections(
    seed: int,
    r: int,
    max_in: int,
    max_out: int,
    *,
    xp: Any,
    dtype: Any = None,
    device: Any = None,
) -> tuple[Any, Any]:
    """The shared pair ``A`` (r x max_in, fan_in = max_in) and ``B`` (max_out x r, fan_in = r).

    A layer of shape (out, in) and rank ``r' <= r`` uses ``A[:r', :in]`` and
    ``B[:out, :r']``.

    Parameters
    ----------
    seed : int
        Integer in ``[0, 2**64)``.
    r : int
        Rank (rows of A, columns of B).
    max_in, max_out : int
        The largest input and output features among the adapted layers.
    xp : namespace
        The Array API namespace to generate with.
    dtype : dtype, optional
        Default float32.
    device : device, optional
        Default the namespace's default device.

    Returns
    -------
    tuple of array
        ``(A, B)``.

    Examples
    --------
    >>> import numpy as xp
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> A.shape, B.shape
    ((4, 8), (6, 4))
    """
    check_namespace(xp)
    check_positive_int("r", r)
    check_positive_int("max_in", max_in)
    check_positive_int("max_out", max_out)
    A = kaiming_uniform(seed, MATRIX_A, (r, max_in), max_in, xp=xp, dtype=dtype, device=device)
    B = kaiming_uniform(seed, MATRIX_B, (max_out, r), r, xp=xp, dtype=dtype, device=device)
    return A, B
