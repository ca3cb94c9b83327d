"""One layer's adapter bank, and the sparse gradients of a bank: rows, not whole tables.

A :class:`LayerBank` belongs to one :class:`~vera_numpy.bank_layer.BankLinear` and one
projection key (:class:`vera_core.slots.ProjectionKey`). Row ``s`` holds the adapter in
slot ``s`` of the model's :class:`vera_core.slots.SlotTable` (the same row in every
layer): ``lambda_d`` (capacity x width, zero-padded past the adapter's rank),
``lambda_b`` (capacity x out) and, once an adapter needs them, ``magnitude`` (DVoRA) and
``bias`` (an adapter that trains the layer's bias keeps its own). Rows of adapters that
do not adapt this layer, and free rows, are zero, so a gather of any row is exact. Per
row the bank also keeps, on the device and updated in place, the method, the rank
and the flags a forward needs (no per-step rebuild).

A bank's gradient is a :class:`RowGrad`: the rows a step used and their values. Adding
two (two backward passes) concatenates them; :meth:`RowGrad.coalesced` sums repeated rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from array_api_compat import array_namespace, is_cupy_namespace, is_numpy_namespace
from array_api_compat import device as device_of

import vera_core as vc
from vera_core.slots import ProjectionKey

NONE, VERA, DVORA = 0, 1, 2
"""Per-row method codes: no adapter in this layer, VeRA, DVoRA."""

OPTIONAL = ("magnitude", "bias")


@dataclasses.dataclass
class RowGrad:
    """The gradient of a bank parameter on some of its rows: ``values[i]`` belongs to row ``rows[i]``.

    Examples
    --------
    >>> import numpy as np
    >>> g = RowGrad(np.asarray([2, 0]), np.ones((2, 3))) + RowGrad(np.asarray([2]), np.ones((1, 3)))
    >>> c = g.coalesced()
    >>> c.rows.tolist(), c.values[:, 0].tolist()
    ([0, 2], [1.0, 2.0])
    """

    rows: Any
    """(k,) integer rows of the parameter."""
    values: Any
    """(k, columns), in the parameter's dtype."""
    unique: bool = True
    """Whether every row appears once."""

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of ``values``."""
        return tuple(self.values.shape)

    def __add__(self, other: RowGrad) -> RowGrad:
        xp = array_namespace(self.values, other.values)
        return RowGrad(xp.concat([self.rows, other.rows]), xp.concat([self.values, other.values]), unique=False)

    def coalesced(self) -> RowGrad:
        """Each row once, in increasing order, with the values of its repeats summed."""
        if self.unique:
            return self
        xp = array_namespace(self.values, self.rows)
        rows, inverse = xp.unique_inverse(self.rows)
        return RowGrad(rows, vc.segment_sum(self.values, inverse, int(rows.shape[0])))


def put_rows(table: Any, rows: Any, values: Any) -> None:
    """``table[rows] = values`` in place, for distinct ``rows`` (NumPy, CuPy: the library's own indexing).

    The Array API has no integer-array assignment: other namespaces write
    ``where(row is one of rows, the values scattered by a one-hot product, table)``,
    which costs O(capacity) per call (a testing path).
    """
    xp = array_namespace(table, values)
    if is_numpy_namespace(xp) or is_cupy_namespace(xp):
        table[rows, ...] = values
        return
    capacity = table.shape[0]
    onehot = rows[None, :] == xp.arange(capacity, dtype=rows.dtype, device=device_of(table))[:, None]
    scattered = xp.astype(onehot, values.dtype) @ xp.reshape(values, (values.shape[0], -1))
    hit = xp.reshape(xp.any(onehot, axis=1), (capacity,) + (1,) * (table.ndim - 1))
    table[...] = xp.where(hit, xp.reshape(scattered, table.shape), table)


class LayerBank:
    """The stacked vectors of one layer's adapters on one projection key.

    Parameters
    ----------
    key : ProjectionKey
        The shared pair every row of this bank uses.
    out_features : int
    capacity : int
        Rows (the model's slot capacity).
    width : int
        Columns of ``lambda_d`` (the largest rank of the bank's adapters).
    xp, device, dtype
        Namespace, device and dtype of the vectors.

    Examples
    --------
    >>> import numpy as np
    >>> import vera_core as vc
    >>> bank = LayerBank(ProjectionKey(vc.PRNG_ID, 0, 4, 8, 6), 6, capacity=2, width=4, xp=np, device="cpu",
    ...                  dtype=np.float32)
    >>> bank.write(1, VERA, 4, lambda_d=0.1)
    >>> bank.slots(), bank.arrays["lambda_d"].shape, bank.rank_mask(np.asarray([1, 0])).tolist()
    ([1], (2, 4), [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    """

    def __init__(
        self, key: ProjectionKey, out_features: int, *, capacity: int, width: int, xp: Any, device: Any, dtype: Any
    ) -> None:
        self.key, self.out_features = key, out_features
        self.xp, self.device, self.dtype = xp, device, dtype
        self.arrays: dict[str, Any] = {
            "lambda_d": xp.zeros((capacity, width), dtype=dtype, device=device),
            "lambda_b": xp.zeros((capacity, out_features), dtype=dtype, device=device),
        }
        self.methods = [NONE] * capacity
        self.ranks = [0] * capacity
        self.own_bias = [False] * capacity
        self.method_codes = xp.zeros(capacity, dtype=xp.int32, device=device)
        """(capacity,) the method of each row, on the device."""
        self.rank_rows = xp.zeros(capacity, dtype=xp.int32, device=device)
        """(capacity,) the rank of each row, on the device."""
        self.own_bias_rows = xp.zeros(capacity, dtype=xp.bool, device=device)
        self.detach_rows = xp.zeros(capacity, dtype=xp.bool, device=device)
        self.counts = {"rows": 0, "dvora": 0, "own_bias": 0}

    @property
    def capacity(self) -> int:
        """Rows held (free rows included)."""
        return len(self.methods)

    @property
    def width(self) -> int:
        """Columns of ``lambda_d``: the largest rank a row may have."""
        return int(self.arrays["lambda_d"].shape[1])

    def grow(self, capacity: int, width: int | None = None) -> None:
        """Hold ``capacity`` rows (and ``width`` columns of ``lambda_d``); existing rows keep their values."""
        width = self.width if width is None else width
        if capacity < self.capacity or width < self.width:
            raise ValueError(f"a bank only grows: ({self.capacity}, {self.width}) -> ({capacity}, {width})")
        if (capacity, width) == (self.capacity, self.width):
            return
        for kind, array in self.arrays.items():
            self.arrays[kind] = vc.grown(array, (capacity, width if kind == "lambda_d" else self.out_features))
        self.rank_rows = vc.grown(self.rank_rows, (capacity,))
        self.method_codes = vc.grown(self.method_codes, (capacity,))
        self.own_bias_rows = vc.grown(self.own_bias_rows, (capacity,))
        self.detach_rows = vc.grown(self.detach_rows, (capacity,))
        extra = capacity - len(self.methods)
        self.methods.extend([NONE] * extra)
        self.ranks.extend([0] * extra)
        self.own_bias.extend([False] * extra)

    def write(
        self,
        slot: int,
        method: int,
        rank: int,
        *,
        lambda_d: Any,
        lambda_b: Any = None,
        magnitude: Any = None,
        bias: Any = None,
        detach_norm: bool = False,
    ) -> None:
        """Put one adapter's vectors into row ``slot`` (the caller checked shapes and values).

        ``lambda_d`` may be a number (every entry of the rank gets it); ``lambda_b`` None
        leaves it zero. Costs O(the row), whatever the capacity.
        """
        xp = self.xp
        if rank > self.width:
            self.grow(self.capacity, rank)
        if self.methods[slot]:
            self.clear(slot)
        d = self.arrays["lambda_d"]
        if isinstance(lambda_d, float | int):
            d[slot, :rank] = xp.full(rank, float(lambda_d), dtype=self.dtype, device=self.device)
        else:
            d[slot, :rank] = xp.astype(lambda_d, self.dtype)
        if lambda_b is not None:
            self.arrays["lambda_b"][slot, :] = xp.astype(lambda_b, self.dtype)
        for kind, value in (("magnitude", magnitude), ("bias", bias)):
            if value is not None:
                self._ensure(kind)[slot, :] = xp.astype(value, self.dtype)
        self.methods[slot], self.ranks[slot], self.own_bias[slot] = method, rank, bias is not None
        self.method_codes[slot] = method
        self.rank_rows[slot] = rank
        self.own_bias_rows[slot] = bias is not None
        self.detach_rows[slot] = detach_norm
        self._count(slot, 1)

    def clear(self, slot: int) -> None:
        """Zero row ``slot`` (its adapter was deleted)."""
        for array in self.arrays.values():
            array[slot, ...] = 0.0
        self._count(slot, -1)
        self.methods[slot], self.ranks[slot], self.own_bias[slot] = NONE, 0, False
        self.method_codes[slot] = NONE
        self.rank_rows[slot] = 0
        self.own_bias_rows[slot] = False
        self.detach_rows[slot] = False

    def _ensure(self, kind: str) -> Any:
        if kind not in self.arrays:
            self.arrays[kind] = self.xp.zeros_like(self.arrays["lambda_b"])
        return self.arrays[kind]

    def _count(self, slot: int, sign: int) -> None:
        if not self.methods[slot]:
            return
        self.counts["rows"] += sign
        self.counts["dvora"] += sign * (self.methods[slot] == DVORA)
        self.counts["own_bias"] += sign * self.own_bias[slot]

    def rank_mask(self, rows: Any) -> Any:
        """(n, width): one within the rank of each of ``rows``, zero in the padding of ``lambda_d``."""
        xp = self.xp
        columns = xp.arange(self.width, dtype=xp.int32, device=self.device)
        return xp.astype(columns[None, :] < xp.take(self.rank_rows, rows, axis=0)[:, None], self.dtype)

    def slots(self) -> list[int]:
        """The rows that hold an adapter for this layer."""
        return [slot for slot, method in enumerate(self.methods) if method]

    def holds(self, slot: int) -> bool:
        """Whether row ``slot`` holds an adapter for this layer."""
        return 0 <= slot < len(self.methods) and self.methods[slot] != NONE

    def vectors(self, slot: int) -> dict[str, Any]:
        """The adapter in row ``slot`` as vectors of its own lengths (views of the bank)."""
        vectors = {
            "lambda_d": self.arrays["lambda_d"][slot, : self.ranks[slot]],
            "lambda_b": self.arrays["lambda_b"][slot, :],
        }
        if self.methods[slot] == DVORA:
            vectors["magnitude"] = self.arrays["magnitude"][slot, :]
        if self.own_bias[slot]:
            vectors["bias"] = self.arrays["bias"][slot, :]
        return vectors
