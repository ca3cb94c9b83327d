"""One layer's adapter bank: the vectors of every adapter on one shared pair, stacked by row.

An :class:`AdapterBank` belongs to one :class:`~vera_torch.layers.VeraLinear` and one
projection key. Row ``s`` holds the adapter in slot ``s`` of the model's
:class:`vera_core.slots.SlotTable` (the same row in every layer): ``lambda_d`` (capacity x
width, zero-padded past the adapter's rank), ``lambda_b`` (capacity x out), and, once an
adapter needs them, ``magnitude`` (DVoRA) and ``bias`` (an adapter that trains the
layer's bias keeps its own). Rows of adapters that do not adapt this layer, and free rows,
are zero, so a gather of any row is exact. Per row the bank also knows, on the host (in
plain lists, which ``torch.compile`` reads as constants), the adapter's method and rank in
this layer.

Gradients: a bank of capacity 1 is an ordinary parameter; past that, gathers produce
sparse gradients holding only the rows a step used (:class:`vera_torch.BankAdamW`
updates exactly those rows; ``torch.optim`` optimizers other than ``SparseAdam`` refuse
sparse gradients instead of silently decaying the other adapters).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional

from vera_core.segments import grown
from vera_torch.projections import ProjectionKey

__all__ = ["DVORA", "NONE", "VERA", "AdapterBank"]

NONE, VERA, DVORA = 0, 1, 2
"""Per-row method codes: no adapter in this layer, VeRA, DVoRA."""

_OPTIONAL = ("magnitude", "bias")


class RowGenerations:
    """How many times each row was written: an optimizer's per-row state is stale once it changed.

    Held by the bank; each of its parameters points to it (attribute ``vera_row_generations``),
    so :class:`vera_torch.BankAdamW` resets the state of a row reused by a new adapter.
    """

    def __init__(self, capacity: int) -> None:
        self.counts = [0] * capacity
        self._device: dict[torch.device, torch.Tensor] = {}

    def bump(self, slot: int) -> None:
        """Row ``slot`` now holds a different adapter (or none)."""
        self.counts[slot] += 1
        self._device.clear()

    def grow(self, capacity: int) -> None:
        self.counts.extend([0] * (capacity - len(self.counts)))
        self._device.clear()

    def on(self, device: torch.device) -> torch.Tensor:
        """The counts as an int64 tensor on ``device`` (made again only after a change)."""
        found = self._device.get(device)
        if found is None:
            found = self._device[device] = torch.tensor(self.counts, dtype=torch.int64, device=device)
        return found


def _resize_parameter(param: nn.Parameter, rows: int, cols: int) -> None:
    """Grow ``param`` in place (the same Parameter object, so a holder keeps seeing it), grad too."""
    with torch.no_grad():
        param.data = grown(param.data, (rows, cols))
    if param.grad is not None:
        grad = param.grad.to_dense() if param.grad.is_sparse else param.grad
        param.grad = grown(grad, (rows, cols))


class AdapterBank(nn.Module):
    """The stacked vectors of one layer's adapters on one projection key.

    Parameters
    ----------
    key : ProjectionKey
        The shared pair every row of this bank uses.
    out_features : int
        The layer's output features.
    capacity : int
        Rows (the model's slot capacity).
    width : int
        Columns of ``lambda_d`` (the largest rank of the bank's adapters).
    device, dtype
        Of the vectors.

    Examples
    --------
    >>> import vera_core as vc
    >>> bank = AdapterBank(ProjectionKey(vc.PRNG_ID, 0, 4, 8, 6), 6, capacity=2, width=4)
    >>> bank.write(1, VERA, 4, lambda_d=torch.full((4,), 0.1), lambda_b=torch.zeros(6))
    >>> bank.slots(), bank.lambda_d.shape
    ([1], torch.Size([2, 4]))
    """

    def __init__(
        self,
        key: ProjectionKey,
        out_features: int,
        *,
        capacity: int,
        width: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.key = key
        self.out_features = out_features
        self.lambda_d = nn.Parameter(torch.zeros(capacity, width, device=device, dtype=dtype))
        self.lambda_b = nn.Parameter(torch.zeros(capacity, out_features, device=device, dtype=dtype))
        self.magnitude: nn.Parameter | None
        self.bias: nn.Parameter | None
        for kind in _OPTIONAL:
            self.register_parameter(kind, None)
        self.methods = [NONE] * capacity
        self.ranks = [0] * capacity
        self.own_bias = [False] * capacity
        self.detach_norm = [False] * capacity
        # plain containers, mutated in place: a Module's attribute assignment is slow
        self._counts = {"rows": 0, "dvora": 0, "own_bias": 0, "narrow": 0}
        self._shape = [capacity, width]
        self._masks: dict[str, torch.Tensor] = {}
        self.trainable = True
        """False for a bank made after FSDP2 sharded the model: it serves, but never trains."""
        self.generations = RowGenerations(capacity)
        self._tag()

    def _tag(self) -> None:
        """Point every parameter at the row generations (for BankAdamW)."""
        for param in self.parameters_by_kind().values():
            param.vera_row_generations = self.generations  # type: ignore[attr-defined,unused-ignore]  # torch may be absent for mypy

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Copies (``copy.deepcopy``, pickle) make new parameters: tag them too."""
        super().__setstate__(state)
        self._tag()

    # ------------------------------------------------------------------ shape
    @property
    def capacity(self) -> int:
        """Rows held (free rows included)."""
        return self._shape[0]

    @property
    def width(self) -> int:
        """Columns of ``lambda_d``: the largest rank a row may have."""
        return self._shape[1]

    @property
    def rows_held(self) -> int:
        """Rows holding an adapter."""
        return self._counts["rows"]

    @property
    def dvora_rows(self) -> int:
        """Rows holding a DVoRA adapter."""
        return self._counts["dvora"]

    @property
    def own_bias_rows(self) -> int:
        """Rows whose adapter trains its own bias."""
        return self._counts["own_bias"]

    @property
    def narrow_rows(self) -> int:
        """Rows whose rank is below the bank's width (zero-padded ``lambda_d``)."""
        return self._counts["narrow"]

    @property
    def sparse(self) -> bool:
        """Whether gathers give sparse gradients (more than one row)."""
        return self.capacity > 1

    def parameters_by_kind(self) -> dict[str, nn.Parameter]:
        """The bank's parameters that exist: ``lambda_d``, ``lambda_b`` and maybe ``magnitude``, ``bias``."""
        found = {"lambda_d": self.lambda_d, "lambda_b": self.lambda_b}
        for kind in _OPTIONAL:
            value = getattr(self, kind)
            if value is not None:
                found[kind] = value
        return found

    def grow(self, capacity: int, width: int | None = None) -> None:
        """Hold ``capacity`` rows (and ``width`` columns of ``lambda_d``); existing rows keep their values."""
        width = self.width if width is None else width
        if capacity < self.capacity or width < self.width:
            raise ValueError(f"a bank only grows: ({self.capacity}, {self.width}) -> ({capacity}, {width})")
        if capacity == self.capacity and width == self.width:
            return
        _resize_parameter(self.lambda_d, capacity, width)
        for kind, param in self.parameters_by_kind().items():
            if kind != "lambda_d":
                _resize_parameter(param, capacity, self.out_features)
        extra = capacity - len(self.methods)
        self.methods.extend([NONE] * extra)
        self.ranks.extend([0] * extra)
        self.own_bias.extend([False] * extra)
        self.detach_norm.extend([False] * extra)
        self._shape[:] = [capacity, width]
        self.generations.grow(capacity)
        self._counts["narrow"] = sum(1 for m, r in zip(self.methods, self.ranks, strict=True) if m and r < width)
        self._masks.clear()

    def _ensure(self, kind: str) -> nn.Parameter:
        param = getattr(self, kind)
        if param is None:
            like = self.lambda_b
            param = nn.Parameter(torch.zeros_like(like), requires_grad=like.requires_grad)
            setattr(self, kind, param)
            self._tag()
        return param

    def freeze(self) -> None:
        """No parameter of the bank requires grad (a new bank holds no active adapter yet)."""
        for param in self.parameters_by_kind().values():
            param.requires_grad_(False)

    # ------------------------------------------------------------------ rows
    def write(
        self,
        slot: int,
        method: int,
        rank: int,
        *,
        lambda_d: torch.Tensor | float,
        lambda_b: torch.Tensor | None = None,
        magnitude: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        detach_norm: bool = False,
    ) -> None:
        """Put one adapter's vectors into row ``slot`` (the caller checked shapes and values).

        ``lambda_d`` may be a number (every entry of the rank gets it); ``lambda_b`` None
        leaves it zero.
        """
        if rank > self.width:
            self.grow(self.capacity, rank)
        if self.methods[slot]:
            self.clear(slot)
        with torch.no_grad():  # a free row is zero: only the adapter's own entries are written
            if isinstance(lambda_d, torch.Tensor):
                self.lambda_d[slot, :rank] = lambda_d
            else:
                self.lambda_d[slot, :rank].fill_(lambda_d)
            if lambda_b is not None:
                self.lambda_b[slot] = lambda_b
            if magnitude is not None:
                self._ensure("magnitude")[slot] = magnitude
            if bias is not None:
                self._ensure("bias")[slot] = bias
        self.mark(slot, method, rank, own_bias=bias is not None, detach_norm=detach_norm)

    def mark(self, slot: int, method: int, rank: int, *, own_bias: bool, detach_norm: bool) -> None:
        """Record that row ``slot`` (free, and written by the caller) now holds an adapter of this kind."""
        self.methods[slot], self.ranks[slot], self.own_bias[slot] = method, rank, own_bias
        self.detach_norm[slot] = detach_norm
        self._count(slot, 1)
        self.generations.bump(slot)
        self._masks.clear()

    def clear(self, slot: int) -> None:
        """Zero row ``slot`` (its adapter was deleted)."""
        with torch.no_grad():
            for param in self.parameters_by_kind().values():
                param[slot].zero_()
        self._count(slot, -1)
        self.generations.bump(slot)
        self.methods[slot], self.ranks[slot], self.own_bias[slot] = NONE, 0, False
        self.detach_norm[slot] = False
        self._masks.clear()

    def _count(self, slot: int, sign: int) -> None:
        """Update the row counters for the adapter in ``slot`` entering (+1) or leaving (-1)."""
        if not self.methods[slot]:
            return
        counts = self._counts
        counts["rows"] += sign
        counts["dvora"] += sign * (self.methods[slot] == DVORA)
        counts["own_bias"] += sign * self.own_bias[slot]
        counts["narrow"] += sign * (self.ranks[slot] < self._shape[1])

    def slots(self) -> list[int]:
        """The rows that hold an adapter for this layer."""
        return [slot for slot, method in enumerate(self.methods) if method]

    def holds(self, slot: int) -> bool:
        """Whether row ``slot`` holds an adapter for this layer."""
        return 0 <= slot < len(self.methods) and self.methods[slot] != NONE

    def holds_any(self, slots: list[int]) -> bool:
        """Whether any of ``slots`` holds an adapter for this layer."""
        return any(self.methods[slot] for slot in slots)

    def row(self, slot: int, kind: str) -> torch.Tensor:
        """One row of one kind as a vector of the adapter's own length (a view: it sees updates)."""
        param = getattr(self, kind)
        if param is None:
            raise KeyError(f"this bank has no {kind} rows")
        vector = param[slot]
        return vector[: int(self.ranks[slot])] if kind == "lambda_d" else vector

    def gather(self, kind: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (n,) of one kind, (n, columns); differentiable, sparse gradients past capacity 1."""
        param = getattr(self, kind)
        if self.capacity == 1:
            return param.expand(index.shape[0], -1)
        return functional.embedding(index, param, sparse=True)

    def mask(self, name: str, device: torch.device) -> torch.Tensor:
        """A per-row device mask, cached until the bank changes.

        ``"dvora"``, ``"own_bias"``, ``"detach_norm"``: (capacity,) bool; ``"rank"``: (capacity,
        width) float, one within each row's rank (to keep the zero padding of ``lambda_d`` out
        of training).
        """
        cached = self._masks.get(name)
        if cached is None or cached.device != device:
            if name == "dvora":
                cached = torch.tensor([m == DVORA for m in self.methods], device=device)
            elif name == "rank":
                ranks = torch.tensor(self.ranks, device=device)
                cached = (torch.arange(self.width, device=device)[None, :] < ranks[:, None]).to(self.lambda_d.dtype)
            else:
                cached = torch.tensor(getattr(self, name), device=device)
            self._masks[name] = cached
        return cached

    def extra_repr(self) -> str:
        return f"rows={self.rows_held}/{self.capacity}, width={self.width}, out={self.out_features}"
