"""``BankLinear``: a frozen dense layer serving any number of VeRA / DVoRA adapters, one per batch row.

The layer keeps one :class:`~vera_numpy.bank.LayerBank` per shared projection pair and
serves the per-row choice of its model (:class:`Rows`, made once per selection and shared
by every layer): per bank one gather of rows, whatever the number of adapters, through
the core's row functions (:func:`vera_core.vera_rows_forward`,
:func:`vera_core.dvora_norm_rows`, :func:`vera_core.dvora_rows_output` and their
backward :func:`vera_core.vera_rows_backward`, :func:`vera_core.dvora_rows_backward`).
The gradients are :class:`~vera_numpy.bank.RowGrad`: the adapters the batch used, summed
over their rows (:func:`vera_core.segment_sum`), never a row per adapter of the bank.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

import vera_core as vc
from vera_core.slots import ProjectionKey, SlotTable
from vera_numpy._backend import Backend, vector_dtype
from vera_numpy.bank import DVORA, LayerBank, RowGrad
from vera_numpy.layers import Layer, dropout_mask

BASE_ADAPTER = "__base__"
"""In a selection of per-row adapters: rows that use no adapter (PEFT's convention)."""


@dataclasses.dataclass
class Rows:
    """One selection of per-row adapters, turned into index arrays once and shared by every layer."""

    slots: Any
    """(batch,) int64 slots on the device, ``-1`` for rows without an adapter."""
    used: Any
    """(u,) the distinct slots, increasing (``-1`` first when some row has no adapter)."""
    inverse: Any
    """(batch,) each row's position in ``used``."""
    first: int
    """Where the adapters start in ``used`` (1 when ``used[0]`` is ``-1``)."""
    safe: Any
    """``slots`` with ``-1`` replaced by 0: a row to gather for rows without an adapter (then masked)."""
    valid: Any
    """(batch, 1) bool: the rows with an adapter (None when every row has one)."""
    dropout: Any = None
    """(batch,) each row's adapter's dropout probability, or None when no row has dropout."""

    @property
    def batch(self) -> int:
        """Rows of the batch."""
        return int(self.slots.shape[0])

    @classmethod
    def of(cls, backend: Backend, slots: np.ndarray, dropout: np.ndarray | None) -> Rows:
        """The selection from host slots (and per-slot dropout probabilities), copied to the device once."""
        used, inverse = np.unique(slots, return_inverse=True)
        xp = backend.xp

        def device(host: np.ndarray) -> Any:
            return xp.astype(backend.from_host(host), xp.int64)

        first = int(used.shape[0] > 0 and used[0] < 0)
        return cls(
            device(slots),
            device(used),
            device(inverse.reshape(-1)),
            first,
            device(np.maximum(slots, 0)),
            backend.from_host((slots >= 0)[:, None]) if first else None,
            None if dropout is None or not np.any(dropout) else backend.from_host(dropout),
        )


@dataclasses.dataclass
class BankState:
    """What every :class:`BankLinear` of one model shares: slots, projection pairs, the current rows."""

    backend: Backend
    fan_in_fan_out: bool = False
    slots: SlotTable = dataclasses.field(default_factory=SlotTable)
    pairs: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    """The shared (A, B) of each projection key, by key name."""
    rows: Rows | None = None
    broadcast: int | None = None
    """A selection of one slot for every row of any batch (``use("name")``), or None."""
    _broadcast_rows: dict[int, Rows] = dataclasses.field(default_factory=dict)
    dropout: list[float] = dataclasses.field(default_factory=list)
    """Each slot's dropout probability."""

    def rows_for(self, batch: int) -> Rows:
        """The selection for a batch of ``batch`` rows; RuntimeError when none fits."""
        if self.broadcast is not None:
            found = self._broadcast_rows.get(batch)
            if found is None:
                slot = self.broadcast
                rate = self.dropout[slot] if slot >= 0 else 0.0
                found = Rows.of(
                    self.backend, np.full(batch, slot, dtype=np.int64), np.full(batch, rate, dtype=np.float32)
                )
                self._broadcast_rows = {batch: found}
            return found
        if self.rows is None:
            raise RuntimeError("no adapters are selected: call model.use(names) first (one name per row, or one name)")
        if self.rows.batch != batch:
            raise ValueError(
                f"the selection has {self.rows.batch} rows but the batch has {batch}; "
                "give one adapter name (or '__base__') per row"
            )
        return self.rows


class _DvoraRows(NamedTuple):
    """A bank's DVoRA adapters in one batch, as the forward found them."""

    bank: LayerBank
    positions: Any
    """(k,) their positions in ``Rows.used``."""
    slots: Any
    """(k,) their slots."""
    row_to_dv: Any
    """(batch,) each row's adapter among the k, or -1."""
    magnitude: Any
    lambda_d: Any
    lambda_b: Any
    norm: Any
    frozen: vc.DvoraFrozen


@dataclasses.dataclass
class _Saved:
    """What one forward keeps for the backward."""

    x_shape: tuple[int, ...]
    rows: Rows
    mask: Any
    z: Any
    per_bank: list[tuple[LayerBank, Any, Any, Any]]
    """(bank, u, lambda_d rows, lambda_b rows) of every bank."""
    dvora: list[_DvoraRows]
    """The banks with DVoRA rows in the batch."""
    own_bias: bool


class BankLinear(Layer):
    """A frozen dense layer plus adapter banks, each row of a batch served by its own adapter.

    Made by :class:`~vera_numpy.BankModel` (``model.layer(name)``). ``parameters()``
    are the bank arrays (``"<key>.lambda_d"`` (capacity, width), ...); ``grads()`` are
    :class:`~vera_numpy.bank.RowGrad` of the rows a batch used (train with
    :class:`~vera_numpy.BankAdamW`).

    Parameters
    ----------
    weight : array, shape (out, in)
        The frozen weight (or (in, out) with the state's ``fan_in_fan_out``). Never modified.
    bias : array, shape (out,), optional
        The frozen bias; adapters that train a bias keep their own copy in the bank.
    state : BankState
        The model's shared state.
    seed : int
        Dropout stream of this layer, in ``[0, 2**32)``.
    """

    def __init__(self, weight: Any, bias: Any, state: BankState, *, seed: int = 0) -> None:
        super().__init__()
        self.weight, self.bias, self.state = weight, bias, state
        self.fan_in_fan_out = state.fan_in_fan_out
        rows, cols = weight.shape
        self.out_features, self.in_features = (cols, rows) if self.fan_in_fan_out else (rows, cols)
        self.xp, self.device = state.backend.xp, state.backend.device
        self.vector_dtype = vector_dtype(self.xp, weight.dtype)
        self.banks: dict[str, LayerBank] = {}
        self.seed, self._draws = seed, 0
        self._frozen: dict[tuple[str, int], vc.DvoraFrozen] = {}
        self._magnitude: Any = None
        self._last: _Saved | None = None

    # ------------------------------------------------------------------ adapters
    def bank(self, key: ProjectionKey, capacity: int) -> LayerBank:
        """The bank of ``key`` (made, with ``capacity`` rows, on first use)."""
        if key.name not in self.banks:
            self.banks[key.name] = LayerBank(
                key,
                self.out_features,
                capacity=capacity,
                width=1,
                xp=self.xp,
                device=self.device,
                dtype=self.vector_dtype,
            )
        return self.banks[key.name]

    def drop_empty_banks(self) -> None:
        """Forget banks that hold no adapter any more (and their DVoRA precomputations)."""
        for name in [name for name, bank in self.banks.items() if not bank.counts["rows"]]:
            del self.banks[name]
            self._frozen = {k: v for k, v in self._frozen.items() if k[0] != name}

    def initial_magnitude(self) -> Any:
        """``||W0_i||`` per output row in the vectors' dtype (computed once per layer)."""
        if self._magnitude is None:
            self._magnitude = vc.initial_magnitude(
                self.weight, fan_in_fan_out=self.fan_in_fan_out, dtype=self.vector_dtype
            )
        return self._magnitude

    def parameters(self) -> dict[str, Any]:
        return {f"{name}.{kind}": array for name, bank in self.banks.items() for kind, array in bank.arrays.items()}

    def grads(self) -> dict[str, Any]:
        for name, grad in self._grads.items():
            self._grads[name] = grad.coalesced()
        return dict(self._grads)

    def _frozen_of(self, bank: LayerBank) -> vc.DvoraFrozen:
        key = (bank.key.name, bank.width)
        if key not in self._frozen:
            A = self.state.pairs[bank.key.name][0]
            self._frozen[key] = vc.dvora_precompute(self.weight, A, bank.width, fan_in_fan_out=self.fan_in_fan_out)
        return self._frozen[key]

    # ------------------------------------------------------------------ forward
    def forward(self, x: Any) -> Any:
        """The base output plus each row's adapter (scaled by its ``m / n`` for DVoRA, its bias after)."""
        xp = self.xp
        if x.ndim < 2:
            raise ValueError(f"a bank layer needs inputs of shape (batch, ..., in_features), got {tuple(x.shape)}")
        rows = self.state.rows_for(int(x.shape[0]))
        banks = [bank for bank in self.banks.values() if bank.counts["rows"]]
        dvora = any(bank.counts["dvora"] for bank in banks)
        own_bias = any(bank.counts["own_bias"] for bank in banks)
        scaled = dvora or own_bias
        result = vc.linear(x, self.weight, None if scaled else self.bias, fan_in_fan_out=self.fan_in_fan_out)
        mask = None
        if self.training and rows.dropout is not None:
            mask = dropout_mask(xp, x, rows.dropout, self.seed * 2**32 + self._draws)
            self._draws += 1
        per_bank = []
        for bank in banks:
            A, B = self.state.pairs[bank.key.name]
            d_rows = xp.take(bank.arrays["lambda_d"], rows.safe, axis=0)
            b_rows = xp.take(bank.arrays["lambda_b"], rows.safe, axis=0)
            if rows.valid is not None:  # rows without an adapter: a zero lambda_b, so no adapter term
                b_rows = xp.where(rows.valid, b_rows, xp.zeros_like(b_rows))
            result, u = vc.vera_rows_forward(x, A, B, d_rows, b_rows, base=result, dropout_mask=mask)
            per_bank.append((bank, u, d_rows, b_rows))
        z, saved_dvora = result, []
        if dvora:
            m_rows = n_rows = None
            for bank in banks:
                found = self._dvora_rows(bank, rows) if bank.counts["dvora"] else None
                if found is None:
                    continue
                saved_dvora.append(found)
                m_k = vc.take_rows(found.magnitude, found.row_to_dv, fill=1.0)
                n_k = vc.take_rows(found.norm, found.row_to_dv, fill=1.0)
                m_rows = m_k if m_rows is None else m_rows * m_k  # a row's adapter is in one bank: ones elsewhere
                n_rows = n_k if n_rows is None else n_rows * n_k
            if m_rows is not None:
                result = vc.dvora_rows_output(z, m_rows, n_rows)
        if own_bias:
            result = result + self._bias_rows(banks, rows, result)
        elif scaled and self.bias is not None:
            result = result + xp.astype(self.bias, result.dtype)
        self._last = _Saved(tuple(x.shape), rows, mask, z, per_bank, saved_dvora, own_bias)
        return result

    def _dvora_rows(self, bank: LayerBank, rows: Rows) -> _DvoraRows | None:
        """The batch's DVoRA adapters of ``bank`` (None when it has none)."""
        xp = self.xp
        used = rows.used
        safe = xp.where(used >= 0, used, xp.zeros_like(used))
        is_dvora = (xp.take(bank.method_codes, safe, axis=0) == DVORA) & (used >= 0)
        positions = xp.nonzero(is_dvora)[0]
        if positions.shape[0] == 0:
            return None
        count = xp.cumulative_sum(xp.astype(is_dvora, xp.int64)) - 1
        row_to_dv = xp.take(xp.where(is_dvora, count, xp.full_like(count, -1)), rows.inverse, axis=0)
        slots = xp.take(used, positions, axis=0)
        m, d, b = (xp.take(bank.arrays[kind], slots, axis=0) for kind in ("magnitude", "lambda_d", "lambda_b"))
        frozen = self._frozen_of(bank)
        norm = vc.dvora_norm_rows(frozen, self.state.pairs[bank.key.name][1], d, b)
        return _DvoraRows(bank, positions, slots, row_to_dv, m, d, b, norm, frozen)

    def _bias_rows(self, banks: list[LayerBank], rows: Rows, like: Any) -> Any:
        """(batch, 1.., out): each row's adapter's own bias, or the frozen bias (zeros without one)."""
        xp = self.xp
        out = self.out_features
        if self.bias is None:
            bias_rows = xp.zeros((rows.batch, out), dtype=self.vector_dtype, device=self.device)
        else:
            bias_rows = xp.broadcast_to(xp.astype(self.bias, self.vector_dtype)[None, :], (rows.batch, out))
        for bank in banks:
            if bank.counts["own_bias"]:
                own = vc.take_rows(xp.astype(bank.own_bias_rows, xp.int32), rows.slots)[:, None] > 0
                bias_rows = xp.where(own, vc.take_rows(bank.arrays["bias"], rows.slots), bias_rows)
        per_row = (rows.batch,) + (1,) * (like.ndim - 2) + (out,)
        return xp.reshape(xp.astype(bias_rows, like.dtype), per_row)

    # ------------------------------------------------------------------ backward
    def backward(self, grad_y: Any, *, input_grad: bool = True) -> Any:
        """Accumulate the used adapters' gradients (:class:`RowGrad`); return ``dL/dx`` (None unless ``input_grad``)."""
        xp = self.xp
        saved = self._saved(self._last)
        rows = saved.rows
        count = int(rows.used.shape[0])
        kept = rows.used[rows.first :]
        grads: dict[str, Any] = {}

        def add(bank: LayerBank, kind: str, per_used: Any) -> None:
            name = f"{bank.key.name}.{kind}"
            grads[name] = per_used if name not in grads else grads[name] + per_used

        if saved.own_bias:
            token_axes = tuple(range(1, grad_y.ndim - 1))
            per_row = xp.sum(grad_y, axis=token_axes, dtype=self.vector_dtype) if token_axes else grad_y
            per_used = vc.segment_sum(xp.astype(per_row, self.vector_dtype), rows.inverse, count)
            for bank, *_ in saved.per_bank:
                if bank.counts["own_bias"]:
                    safe = xp.where(rows.used >= 0, rows.used, xp.zeros_like(rows.used))
                    own = xp.astype(xp.take(bank.own_bias_rows, safe, axis=0), per_used.dtype)[:, None]
                    add(bank, "bias", per_used * own)
        grad_z = grad_y
        for found in saved.dvora:
            bank = found.bank
            scaled = vc.dvora_rows_backward(
                grad_z,
                saved.z,
                found.frozen,
                self.state.pairs[bank.key.name][1],
                found.magnitude,
                found.lambda_d,
                found.lambda_b,
                found.norm,
                found.row_to_dv,
                detach_norm=xp.take(bank.detach_rows, found.slots, axis=0),
            )
            grad_z = scaled.z
            for kind in ("magnitude", "lambda_d", "lambda_b"):
                add(bank, kind, vc.segment_sum(getattr(scaled, kind), found.positions, count))
        grad_x = None
        for bank, u, d_rows, b_rows in saved.per_bank:
            A, B = self.state.pairs[bank.key.name]
            term = vc.vera_rows_backward(
                grad_z,
                u,
                A,
                B,
                d_rows,
                b_rows,
                in_features=self.in_features,
                dropout_mask=saved.mask,
                input_grad=input_grad,
            )
            add(bank, "lambda_d", vc.segment_sum(term.lambda_d, rows.inverse, count))
            add(bank, "lambda_b", vc.segment_sum(term.lambda_b, rows.inverse, count))
            if input_grad:
                grad_x = term.x if grad_x is None else grad_x + term.x
        for bank, *_ in saved.per_bank:
            safe = xp.where(rows.used >= 0, rows.used, xp.zeros_like(rows.used))
            name = f"{bank.key.name}.lambda_d"
            grads[name] = grads[name] * bank.rank_mask(safe)  # the zero padding stays zero
        for name, per_used in grads.items():
            self._accumulate(name, RowGrad(kept, per_used[rows.first :, ...]))
        if not input_grad:
            return None
        base = vc.linear_input_grad(grad_z, self.weight, fan_in_fan_out=self.fan_in_fan_out)
        return base if grad_x is None else base + grad_x
