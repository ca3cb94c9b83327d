"""Unsigned 32-bit word arithmetic on any Array API namespace.

The standard leaves integer overflow unspecified, and some libraries (PyTorch 2.13)
have no addition or shift kernels for ``uint32``. Words are therefore held in one of
two representations, chosen once per namespace and device by a probe:

* ``uint32`` where the library adds and shifts ``uint32`` with wrap-around (NumPy,
  CuPy, JAX, array-api-strict): no masks are needed;
* ``int64`` holding values in ``[0, 2**32)``, every sum and left shift masked back to
  32 bits, everywhere else.

Both give bit-identical words; the conformance suite checks them against each other.
"""

from __future__ import annotations

from typing import Any

MASK32 = 0xFFFFFFFF

_representation_cache: dict[tuple[str, str], bool] = {}


def _uint32_wraps(xp: Any, device: Any) -> bool:
    """Return True when ``xp`` adds and shifts uint32 words with wrap-around."""
    try:
        a = xp.asarray([MASK32, 0x80000001], dtype=xp.uint32, device=device)
        b = xp.asarray([1, 0x80000001], dtype=xp.uint32, device=device)
        total = a + b
        shifted = (a << 1) | (a >> 31)
        both = xp.concat([total, shifted])
        values = [int(both[i]) for i in range(4)]
    except Exception:  # a missing kernel raises anything from TypeError to RuntimeError
        return False
    return values == [0, 2, MASK32, 3]


class WordOps:
    """Add, rotate and xor 32-bit words held in the representation ``xp`` supports.

    Parameters
    ----------
    xp : namespace
        An Array API namespace.
    device : device
        The device the words live on.
    force_int64 : bool, optional
        Use the masked ``int64`` representation even where ``uint32`` would work
        (used by the tests to compare both representations).

    Examples
    --------
    >>> import numpy as xp
    >>> ops = WordOps(xp, None)
    >>> int(ops.add(ops.asarray([0xFFFFFFFF]), 2)[0])
    1
    """

    def __init__(self, xp: Any, device: Any, *, force_int64: bool = False) -> None:
        self.xp = xp
        self.device = device
        if force_int64:
            native = False
        else:
            key = (getattr(xp, "__name__", repr(xp)), str(device))
            if key not in _representation_cache:
                _representation_cache[key] = _uint32_wraps(xp, device)
            native = _representation_cache[key]
        self.masked = not native
        self.dtype = xp.int64 if self.masked else xp.uint32

    @classmethod
    def python_ints(cls) -> WordOps:
        """Word arithmetic on plain Python integers (for key derivation on the host)."""
        ops = cls.__new__(cls)
        ops.xp, ops.device, ops.masked, ops.dtype = None, None, True, int
        return ops

    def asarray(self, values: Any) -> Any:
        """Words from Python integers in ``[0, 2**32)``."""
        return self.xp.asarray(values, dtype=self.dtype, device=self.device)

    def arange(self, start: int, stop: int) -> Any:
        """The words ``start, start + 1, ..., stop - 1`` (all below ``2**32``)."""
        return self.xp.arange(start, stop, dtype=self.dtype, device=self.device)

    def add(self, a: Any, b: Any) -> Any:
        """``(a + b) mod 2**32``; ``b`` may be a Python int in ``[0, 2**32)``."""
        if self.masked:
            return (a + b) & MASK32
        if isinstance(b, int):  # JAX without x64 cannot hold ints >= 2**31 as weak scalars
            b = self.xp.asarray(b, dtype=self.dtype, device=self.device)
        return a + b

    def rotl(self, x: Any, bits: int) -> Any:
        """Rotate each word left by ``bits`` (0 < bits < 32)."""
        left = x << bits
        if self.masked:
            left = left & MASK32
        return left | (x >> (32 - bits))

    def high_bits(self, x: Any, bits: int) -> Any:
        """The top ``bits`` bits of each word, as a non-negative integer word."""
        return x >> (32 - bits)
