"""Threefry-2x32-20, the counter-based generator of Salmon et al. (SC 2011).

Written with Array API integer operations only (add, shift, or, xor), so it runs
unchanged on every conforming library and on the device its counters live on. It
matches the Random123 known-answer vectors and JAX's ``threefry2x32``.
"""

from __future__ import annotations

from typing import Any

from vera_core._words import MASK32, WordOps

ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
"""Rotation constants of Threefry-2x32 (Random123 ``R_32x2``)."""

KEY_PARITY = 0x1BD11BDA
"""Skein key-schedule parity constant for 32-bit words."""

ROUNDS = 20


def _check_word(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MASK32:
        raise ValueError(f"{name} must be an int in [0, 2**32), got {value!r}")


def threefry2x32(key: tuple[int, int], x0: Any, x1: Any, ops: WordOps) -> tuple[Any, Any]:
    """Encrypt the counter pairs ``(x0, x1)`` under ``key`` with 20 rounds.

    Parameters
    ----------
    key : tuple of two int
        The two key words, each in ``[0, 2**32)``.
    x0, x1 : array
        Counter words in the representation of ``ops``; broadcastable together.
    ops : WordOps
        Word arithmetic for the namespace and device of the counters.

    Returns
    -------
    tuple of array
        The two output words, with the broadcast shape of ``x0`` and ``x1``.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core._words import WordOps
    >>> ops = WordOps(xp, None)
    >>> y0, y1 = threefry2x32((0, 0), ops.asarray([0]), ops.asarray([0]), ops)
    >>> hex(int(y0[0])), hex(int(y1[0]))
    ('0x6b200159', '0x99ba4efe')
    """
    _check_word("key[0]", key[0])
    _check_word("key[1]", key[1])
    schedule = (key[0], key[1], KEY_PARITY ^ key[0] ^ key[1])
    x0 = ops.add(x0, schedule[0])
    x1 = ops.add(x1, schedule[1])
    for i in range(ROUNDS):
        x0 = ops.add(x0, x1)
        x1 = ops.rotl(x1, ROTATIONS[i % 8])
        x1 = x1 ^ x0
        if i % 4 == 3:
            injection = (i + 1) // 4
            x0 = ops.add(x0, schedule[injection % 3])
            x1 = ops.add(x1, (schedule[(injection + 1) % 3] + injection) & MASK32)
    return x0, x1
