"""Adapter names to bank rows: the bookkeeping of an adapter bank, for every backend.

An adapter bank keeps the vectors of N adapters stacked, one row per adapter, in every
adapted layer (``lambda_d`` N x r, ``lambda_b`` N x out, ...). :class:`SlotTable` hands
out the rows ("slots"): adding or deleting an adapter costs O(1) here, whatever N is; a
deleted adapter's slot is reused by the next one added, so the rows of the others never
move (an optimizer's per-row state stays where it is). The arrays themselves belong to
the backend, which grows them when :attr:`SlotTable.capacity` grows.

Capacity grows geometrically by :data:`GROWTH` (at least :data:`MIN_GROWTH` rows), so
adding N adapters one by one copies O(N) rows in all while the arrays hold at most about
``GROWTH`` times the rows in use; :meth:`SlotTable.reserve` sizes them exactly for a bulk
load.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from typing import NamedTuple

GROWTH = 1.05
"""Factor by which the capacity grows when it is full (resident memory <= ~1.05x the rows in use)."""

MIN_GROWTH = 16
"""Rows added at least when the capacity grows (a bank of one adapter has capacity 1)."""


class ProjectionKey(NamedTuple):
    """One shared projection pair: generator, seed (or the checksum of stored projections) and shapes.

    Adapters of one key share the pair, and in every layer one bank of rows.

    Examples
    --------
    >>> key = ProjectionKey("threefry2x32-20", 0, 8, 64, 32)
    >>> key.covers(4, 64, 10), key.covers(16, 64, 10), key.name
    (True, False, 'threefry2x32_20_0_r8_i64_o32')
    """

    prng_id: str
    seed: int
    r: int
    max_in: int
    max_out: int
    checksum: str | None = None

    def covers(self, r: int, in_features: int, out_features: int) -> bool:
        """Whether a layer of this rank and size fits in the pair."""
        return r <= self.r and in_features <= self.max_in and out_features <= self.max_out

    @property
    def name(self) -> str:
        """An identifier usable in parameter names (made once per key: hot paths ask for it)."""
        name = _KEY_NAMES.get(self)
        if name is None:
            tag = self.checksum[:16] if self.checksum else str(self.seed)
            name = _KEY_NAMES[self] = f"{self.prng_id.replace('-', '_')}_{tag}_r{self.r}_i{self.max_in}_o{self.max_out}"
        return name


_KEY_NAMES: dict[ProjectionKey, str] = {}


class SlotTable:
    """Adapter names and the bank rows they occupy.

    Examples
    --------
    >>> table = SlotTable()
    >>> table.add("a"), table.add("b"), table.capacity
    (0, 1, 17)
    >>> table.remove("a")
    0
    >>> table.add("c"), table.slot("b"), len(table)
    (0, 1, 2)
    """

    def __init__(self) -> None:
        self._slots: dict[str, int] = {}
        self._names: list[str | None] = []
        self._free: list[int] = []  # a heap: the lowest free slot is reused first
        self.capacity = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def __iter__(self) -> Iterator[str]:
        return iter(self._slots)

    def names(self) -> list[str]:
        """The adapter names, in the order they were added."""
        return list(self._slots)

    def slot(self, name: str) -> int:
        """The row of adapter ``name``; KeyError naming the known adapters otherwise."""
        try:
            return self._slots[name]
        except KeyError:
            raise KeyError(f"no adapter named {name!r}; the bank holds {len(self._slots)} adapters") from None

    def name_at(self, slot: int) -> str | None:
        """The adapter in row ``slot`` (None for a free row)."""
        return self._names[slot] if 0 <= slot < len(self._names) else None

    def next_capacity(self, extra: int = 1) -> int:
        """The capacity after adding ``extra`` adapters (the current one when they fit)."""
        needed = len(self._slots) + extra
        if needed <= self.capacity:
            return self.capacity
        if self.capacity == 0:
            return needed
        return max(needed, self.capacity + MIN_GROWTH, math.ceil(self.capacity * GROWTH))

    def reserve(self, capacity: int) -> None:
        """Raise the capacity to at least ``capacity`` (the backend grows its arrays to match first)."""
        self.capacity = max(self.capacity, capacity)

    def add(self, name: str) -> int:
        """Give ``name`` a row and return it (the lowest free one); the capacity grows when full."""
        if name in self._slots:
            raise ValueError(f"the bank already holds an adapter named {name!r}")
        if self._free:
            slot = heapq.heappop(self._free)
        else:
            slot = len(self._names)
            self.capacity = self.next_capacity()
            self._names.append(None)
        self._slots[name] = slot
        self._names[slot] = name
        return slot

    def remove(self, name: str) -> int:
        """Free the row of ``name`` and return it."""
        slot = self.slot(name)
        del self._slots[name]
        self._names[slot] = None
        heapq.heappush(self._free, slot)
        return slot
