"""The projection stream, reimplemented in pure Python from ``docs/projection-spec.md``.

This module is an *oracle*: it imports nothing from the rest of vera-core and follows
the specification text step by step with Python integers and floats, so that the
vectorised generator in :mod:`vera_core.projections` can be checked bit for bit on any
backend without NumPy.
"""

from __future__ import annotations

import math
import struct

WORD = 2**32

KNOWN_ANSWERS = (
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344), (0xC4923A9C, 0x483DF7A0)),
)
"""Random123 ``kat_vectors`` for threefry2x32, 20 rounds: ``(counter, key, output)``."""

_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
_PARITY = 0x1BD11BDA


def threefry2x32_20(key: tuple[int, int], counter: tuple[int, int]) -> tuple[int, int]:
    """Threefry-2x32 with 20 rounds on one counter pair (spec section "Threefry").

    Examples
    --------
    >>> [hex(w) for w in threefry2x32_20((0, 0), (0, 0))]
    ['0x6b200159', '0x99ba4efe']
    """
    k = (key[0], key[1], _PARITY ^ key[0] ^ key[1])
    x = [(counter[0] + k[0]) % WORD, (counter[1] + k[1]) % WORD]
    for round_index in range(20):
        x[0] = (x[0] + x[1]) % WORD
        rotation = _ROTATIONS[round_index % 8]
        x[1] = ((x[1] << rotation) | (x[1] >> (32 - rotation))) % WORD
        x[1] ^= x[0]
        if round_index % 4 == 3:
            s = (round_index + 1) // 4
            x[0] = (x[0] + k[s % 3]) % WORD
            x[1] = (x[1] + k[(s + 1) % 3] + s) % WORD
    return x[0], x[1]


def matrix_key(seed: int, matrix: int) -> tuple[int, int]:
    """The key of matrix ``matrix`` (0 for A, 1 for B) under ``seed``.

    Examples
    --------
    >>> [hex(w) for w in matrix_key(0, 1)]
    ['0x508efb2c', '0xc0de3f32']
    """
    return threefry2x32_20((seed % WORD, seed // WORD), (matrix, 0))


def element_words(seed: int, matrix: int, row: int, column: int) -> tuple[int, int]:
    """The two words drawn for element ``(row, column)``: the counter is ``(column, row)``.

    Examples
    --------
    >>> [hex(w) for w in element_words(0, 0, 0, 0)]
    ['0xf84e8312', '0x2fef64f3']
    """
    return threefry2x32_20(matrix_key(seed, matrix), (column, row))


def round_float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (ties to even).

    Examples
    --------
    >>> round_float32(0.1).hex()
    '0x1.99999a0000000p-4'
    """
    return struct.unpack("<f", struct.pack("<f", value))[0]


def round_float16(value: float) -> float:
    """``value`` rounded to the nearest float16 (ties to even).

    Examples
    --------
    >>> round_float16(1.0 + 2.0**-11)
    1.0
    """
    return struct.unpack("<e", struct.pack("<e", value))[0]


def round_bfloat16(value: float) -> float:
    """A float32 ``value`` rounded to the nearest bfloat16 (ties to even).

    Examples
    --------
    >>> round_bfloat16(1.0 + 2.0**-8), round_bfloat16(1.0 + 3 * 2.0**-8)
    (1.0, 1.015625)
    """
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


NARROW_ROUNDING = {"float16": round_float16, "bfloat16": round_bfloat16}
"""How the float32 values are rounded to the 16-bit dtypes."""


def bound(fan_in: int, dtype: str) -> float:
    """``sqrt(6 / fan_in)`` in float64, rounded to float32 unless ``dtype`` is float64.

    Examples
    --------
    >>> bound(6, "float32"), bound(8, "float32").hex()
    (1.0, '0x1.bb67ae0000000p-1')
    """
    value = math.sqrt(6.0 / fan_in)
    return value if dtype == "float64" else round_float32(value)


def element(seed: int, matrix: int, row: int, column: int, fan_in: int, dtype: str) -> float:
    """The value of one element, exactly as the specification defines it.

    Examples
    --------
    >>> -math.sqrt(6 / 8) <= element(0, 0, 0, 0, 8, "float64") < math.sqrt(6 / 8)
    True
    """
    w0, w1 = element_words(seed, matrix, row, column)
    if dtype == "float64":
        k, bits = (w0 >> 5) * 2**26 + (w1 >> 6), 53
    else:
        k, bits = w0 >> 8, 24
    step = bound(fan_in, dtype) * 2.0 ** (1 - bits)
    value = (k - 2 ** (bits - 1)) * step  # exact integer times a power-of-two step, rounded once
    if dtype == "float64":
        return value
    value = round_float32(value)
    return NARROW_ROUNDING[dtype](value) if dtype in NARROW_ROUNDING else value


def matrix_values(seed: int, matrix: int, shape: tuple[int, int], fan_in: int, dtype: str) -> list[list[float]]:
    """Every element of a ``shape`` matrix, as nested lists.

    Examples
    --------
    >>> len(matrix_values(0, 1, (3, 2), 2, "float64")), len(matrix_values(0, 1, (3, 2), 2, "float64")[0])
    (3, 2)
    """
    rows, columns = shape
    return [[element(seed, matrix, i, j, fan_in, dtype) for j in range(columns)] for i in range(rows)]


def projections(
    seed: int, r: int, max_in: int, max_out: int, dtype: str
) -> tuple[list[list[float]], list[list[float]]]:
    """``A`` (r x max_in, fan_in ``max_in``) and ``B`` (max_out x r, fan_in ``r``).

    Examples
    --------
    >>> A, B = projections(0, 4, 8, 6, "float32")
    >>> round(A[0][0], 7), len(B), len(B[0])
    (0.8139738, 6, 4)
    """
    return matrix_values(seed, 0, (r, max_in), max_in, dtype), matrix_values(seed, 1, (max_out, r), r, dtype)
