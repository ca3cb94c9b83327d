"""``VeraLinear``: a linear-like layer serving any number of VeRA / DVoRA adapters from banks.

The wrapper keeps the frozen layer as ``base_layer`` (``nn.Linear``, transformers'
``Conv1D`` or any module whose forward is ``x W^T + b``, quantized ones included) and one
:class:`~vera_torch.bank.AdapterBank` per shared projection pair, holding every adapter's
vectors as one row. The shared projections live once in the model's
:class:`~vera_torch.projections.ProjectionStore`.

A forward serves either the active adapters (one plan, rebuilt only when adapters, the
active set or a merge change: no per-step validation) or, in a mixed-adapter batch, each
row's own adapter (one gather of rows per bank, whatever the number of adapters). The
arithmetic is the core's (:mod:`vera_core`), run on torch tensors: autograd derives the
factored path's gradients from it, and the merged-weight path uses the core's analytic
backward (:mod:`vera_torch.functional`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from typing import Any

import torch
from array_api_compat import torch as xp
from torch import nn
from torch.nn import functional

import vera_core as vc
from vera_core import _lowrank as lr
from vera_core._fused import scale_add as _scale_add
from vera_core.dvora import _gram_norm, _scaled
from vera_core.slots import SlotTable
from vera_torch import quantized
from vera_torch.bank import DVORA, VERA, AdapterBank
from vera_torch.functional import DvoraLinearFunction, VeraLinearFunction
from vera_torch.projections import ProjectionKey, ProjectionStore

__all__ = [
    "BASE_ADAPTER",
    "AdapterSpec",
    "BatchRows",
    "SharedState",
    "VeraLinear",
    "is_conv1d",
    "layer_dims",
]

BASE_ADAPTER = "__base__"
"""In ``adapter_names`` for mixed batches: rows that use no adapter (PEFT's convention)."""


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 style, weight stored (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def layer_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(in_features, out_features, fan_in_fan_out)`` of a linear-like module, or None.

    Examples
    --------
    >>> layer_dims(nn.Linear(3, 5))
    (3, 5, False)
    >>> layer_dims(nn.ReLU()) is None
    True
    """
    if isinstance(module, VeraLinear):
        return module.in_features, module.out_features, module.fan_in_fan_out
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if is_conv1d(module):
        rows, cols = typing.cast(torch.Tensor, module.weight).shape
        return int(rows), int(cols), True
    n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(n_in, int) and isinstance(n_out, int) and not isinstance(module, nn.modules.conv._ConvNd):
        return n_in, n_out, False
    return None


def _plain(base: nn.Module) -> bool:
    """A base whose forward is exactly ``F.linear(x, W, b)`` (or ``x W + b`` for Conv1D) on its own tensors."""
    return type(base) is nn.Linear or (
        type(base).__name__ == "Conv1D" and type(base).__module__.startswith("transformers")
    )


@dataclasses.dataclass(frozen=True, slots=True)
class AdapterSpec:
    """How an adapter works, shared by every layer it adapts (the per-layer rank lives in the banks)."""

    method: str
    key: ProjectionKey
    dropout: float = 0.0
    detach_norm: bool = False


@dataclasses.dataclass
class BatchRows:
    """One forward's per-row adapters: slot per row (``-1``: none), made once per model forward."""

    index: torch.Tensor
    """(batch,) int64 slots, ``-1`` for rows without an adapter."""
    safe: torch.Tensor
    """``index`` with ``-1`` replaced by 0 (a valid row to gather; its contribution is masked)."""
    valid: torch.Tensor
    """(batch, 1) float32: 1 for rows with an adapter, 0 otherwise."""
    dropout: torch.Tensor | None = None
    """(batch,) keep probabilities' complement, per row, when some row's adapter has dropout."""
    trainable: torch.Tensor | None = None
    """(batch, 1) bool: rows whose adapter is active (trains); None when every row's adapter is."""
    expandable: bool = False
    """Whether a batch ``k`` times larger repeats each row's adapter (generation), or is an error."""
    _expanded: dict[int, BatchRows] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(
        cls, index: torch.Tensor, dropout: torch.Tensor | None = None, trainable: torch.Tensor | None = None
    ) -> BatchRows:
        """The per-row choice from a slot tensor (``-1`` for base rows)."""
        valid = index >= 0
        return cls(index, index.clamp_min(0), valid.to(torch.float32)[:, None], dropout, trainable)

    def for_batch(self, batch: int) -> BatchRows:
        """The rows for a batch ``k`` times larger, each row repeated ``k`` times in place.

        Generation expands the batch this way (``repeat_interleave``) for beams and several
        returned sequences, so every expanded row keeps its adapter.
        """
        rows = int(self.index.shape[0])
        if batch == rows:
            return self
        if rows == 0 or batch % rows or not self.expandable:
            raise ValueError(
                f"adapter_names has {rows} entries but the batch has {batch} rows; give one adapter name "
                "(or '__base__') per row"
            )
        factor = batch // rows
        if factor not in self._expanded:

            def repeat(tensor: torch.Tensor) -> torch.Tensor:
                return tensor.repeat_interleave(factor, dim=0)

            self._expanded[factor] = BatchRows(
                repeat(self.index),
                repeat(self.safe),
                repeat(self.valid),
                None if self.dropout is None else repeat(self.dropout),
                None if self.trainable is None else repeat(self.trainable),
                expandable=False,
            )
        return self._expanded[factor]


@dataclasses.dataclass
class SharedState:
    """Model-wide adapter state every :class:`VeraLinear` of one model points at."""

    projections: ProjectionStore
    slots: SlotTable = dataclasses.field(default_factory=SlotTable)
    specs: dict[str, AdapterSpec] = dataclasses.field(default_factory=dict)
    active: list[str] = dataclasses.field(default_factory=list)
    disabled: bool = False
    rows: BatchRows | None = None
    """The current forward's per-row adapters (mixed batch), or None."""
    version: int = 0
    """Bumped on every change a layer's plan depends on (adapters, active set, merges)."""

    def changed(self) -> None:
        """Invalidate every layer's cached plan."""
        self.version += 1


@dataclasses.dataclass(frozen=True)
class _Step:
    """One active adapter on this layer: everything a forward needs, looked up once."""

    name: str
    bank: AdapterBank
    slot: int
    index: torch.Tensor
    rank: int
    method: int
    dropout: float
    detach_norm: bool
    own_bias: bool
    rows: dict[str, nn.Parameter]
    """The bank's parameters by kind (looked up once: module attribute access costs per step)."""
    whole_row: bool
    """The bank has one row and ``lambda_d`` is exactly this adapter's rank: use the parameters as they are."""
    plain: bool
    """The base is a plain ``nn.Linear`` / ``Conv1D``: its forward can be replaced by the merged weight."""
    projections: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = dataclasses.field(
        default_factory=dict
    )
    """``(A_s^T, B_s^T, A_s, B_s)`` per compute dtype and device: A in the compute dtype, B in the vectors'."""
    merged_from: tuple[int, int] = (0, 0)
    """Tokens from which the forward and the backward go through the merged weight (:func:`vera_core.merged_passes`)."""

    def merged(self, tokens: int) -> tuple[bool, bool]:
        """(forward, backward) through the merged weight for activations of ``tokens`` rows."""
        return tokens >= self.merged_from[0], tokens >= self.merged_from[1]


@dataclasses.dataclass(frozen=True)
class _Fast:
    """The common step precomputed: one adapter on a plain frozen base through :class:`VeraLinearFunction`
    or :class:`DvoraLinearFunction` (VeRA on few tokens: the factored operators under autograd), a one-row
    bank, no dropout or own bias, inputs in the compute dtype (no autocast, or autocast to the dtype the
    model already has).

    Built on the first eligible call of a plan (it knows the activations' dtype and device);
    valid while the plan is and the base weight is the same frozen tensor (for DVoRA at
    the same version).
    """

    version: int
    dtype: torch.dtype
    device: torch.device
    device_type: str
    parameters: dict[str, Any]
    """The base layer's parameter dict: its ``"weight"`` must still be :attr:`weight`."""
    weight: torch.Tensor
    weight_version: int | None
    """DVoRA: the weight's version its Gram pieces were computed at (None for VeRA, which keeps nothing of it)."""
    step: _Step
    function: Any
    """``VeraLinearFunction.apply`` or ``DvoraLinearFunction.apply``."""
    arguments: tuple[Any, ...]
    """Its arguments after ``x`` and before ``merged``."""
    autocast_off: bool
    """DVoRA: turn autocast off around it (the norms stay in float32)."""
    composed: tuple[Any, ...] | None
    """VeRA on an ``nn.Linear``: ``(bias, A_s^T, B_s^T, lambda_d, lambda_b)`` for the steps where neither
    pass merges, which run the factored path's operators under autograd (as the general path does)."""


def _merged_from(in_features: int, out_features: int, rank: int) -> tuple[int, int]:
    """The fewest tokens from which :func:`vera_core.merged_passes` merges the forward, and the backward.

    Both are monotone in the tokens: found by bisection on the one rule.
    """

    def first(which: int) -> int:
        high = 1
        while not vc.merged_passes(high, in_features, out_features, rank)[which]:
            high *= 2
            if high > 1 << 40:
                return high
        low = high // 2
        while low + 1 < high:
            middle = (low + high) // 2
            if vc.merged_passes(middle, in_features, out_features, rank)[which]:
                high = middle
            else:
                low = middle
        return high

    return first(0), first(1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off (the core applies its own dtype policy: the norms stay in float32)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class VeraLinear(nn.Module):
    """A frozen linear-like layer plus adapter banks (use :func:`vera_torch.add_vera`).

    Parameters
    ----------
    base_layer : nn.Module
        ``nn.Linear``, transformers ``Conv1D`` or a module computing ``x W^T + b`` with
        integer ``in_features`` / ``out_features`` attributes.
    state : SharedState
        The model's shared state (slots, projections, active adapters).

    Examples
    --------
    >>> import vera_core as vc
    >>> from vera_torch.projections import ProjectionStore, ProjectionKey
    >>> store = ProjectionStore()
    >>> key = store.add(ProjectionKey(vc.PRNG_ID, 0, 4, 8, 6))
    >>> state = SharedState(store)
    >>> layer = VeraLinear(nn.Linear(8, 6), state)
    >>> slot = state.slots.add("a"); state.specs["a"] = AdapterSpec("vera", key); state.active.append("a")
    >>> layer.add_adapter(slot, "vera", key, 4, d_initial=0.1)  # True: it made the bank
    True
    >>> x = torch.randn(2, 8)
    >>> torch.equal(layer(x), layer.base_layer(x))  # lambda_b starts at zero
    True
    """

    _state: SharedState  # set with object.__setattr__: shared by the model's layers, not a submodule

    def __init__(self, base_layer: nn.Module, state: SharedState) -> None:
        super().__init__()
        dims = layer_dims(base_layer)
        if dims is None or isinstance(base_layer, VeraLinear):
            raise TypeError(
                f"{type(base_layer).__name__} is not a linear-like layer: expected nn.Linear, transformers Conv1D "
                "or a module with integer in_features/out_features computing x W^T + b"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = dims
        self.vera_banks = nn.ModuleDict()
        self.merged_adapters: list[str] = []
        self._merge_norms: dict[str, torch.Tensor] = {}
        self._frozen_cache: dict[tuple[str, int], tuple[Any, vc.DvoraFrozen]] = {}
        self._plan: tuple[int, tuple[_Step, ...]] = (-1, ())
        self._fast: _Fast | None = None
        object.__setattr__(self, "_state", state)  # shared, not a submodule

    def _apply(self, fn: Any, recurse: bool = True) -> VeraLinear:
        """Module moves and casts (``.to``, ``.cuda``, ``.half``) also drop the caches built for the old tensors."""
        moved = super()._apply(fn, recurse)
        self._frozen_cache.clear()
        self._plan = (-1, ())
        self._fast = None
        return moved

    # ------------------------------------------------------------------ base layer
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (what transformers code that inspects ``.weight`` expects)."""
        return typing.cast(torch.Tensor, self.base_layer.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias, or None."""
        return getattr(self.base_layer, "bias", None)

    def dense_weight(self, purpose: str) -> torch.Tensor:
        """The base layer's dense floating-point weight; TypeError naming ``purpose`` when it has none."""
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
            raise TypeError(
                f"{purpose} needs the base layer's dense floating-point weight, but "
                f"{type(self.base_layer).__name__} has {type(weight).__name__} "
                f"{getattr(weight, 'dtype', '')}; VeRA's forward works on such layers, {purpose} does not"
            )
        return weight

    def check_weight(self, purpose: str) -> None:
        """TypeError naming ``purpose`` unless the base has a dense or a known quantized weight."""
        if quantized.quantization(self.base_layer) is None:
            self.dense_weight(purpose)

    def frozen_weight(self, purpose: str) -> torch.Tensor:
        """The weight W0 the adapters work against: the dense one, or a quantized base's dequantized one.

        A quantized base (bitsandbytes 4-bit / 8-bit) gives a new float32 tensor each call:
        callers use it and let it go (DVoRA's Gram pieces, merges), so no dense copy is kept.
        """
        if quantized.quantization(self.base_layer) is not None:
            return quantized.dequantize(self.base_layer).weight
        return self.dense_weight(purpose)

    def vector_dtype(self) -> torch.dtype:
        """float32, or the base weight's dtype when that is float32 or wider."""
        weight = getattr(self.base_layer, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.element_size() >= 4:
            return weight.dtype
        return torch.float32

    def device(self) -> torch.device:
        """Where the base layer's tensors live."""
        base = self.base_layer
        for tensor in (*base._parameters.values(), *base._buffers.values()):
            if tensor is not None:
                return tensor.device
        for tensor in (*base.parameters(), *base.buffers()):
            return tensor.device
        return torch.device("cpu")

    def _base(self, x: torch.Tensor, bias: bool | torch.Tensor = True) -> torch.Tensor:
        """``x W0^T`` plus the base bias (``True``), no bias (``False``) or the given bias tensor."""
        base = self.base_layer
        if _plain(base):
            weight = typing.cast(torch.Tensor, base._parameters["weight"])
            base_bias = base._parameters["bias"]
            use = base_bias if bias is True else (None if bias is False else bias)
            if weight.dtype != x.dtype:
                weight = weight.to(x.dtype)
            if use is not None and use.dtype != x.dtype:
                use = use.to(x.dtype)
            if self.fan_in_fan_out:
                product = x @ weight
                return product if use is None else product + use
            return functional.linear(x, weight, use)
        y = base(x)
        if bias is True or (self.bias is None and bias is False):
            return y
        y = y - self.bias.to(y.dtype) if self.bias is not None else y
        return y if bias is False else y + typing.cast(torch.Tensor, bias).to(y.dtype)

    # ------------------------------------------------------------------ adapters
    def bank(self, key: ProjectionKey, capacity: int) -> AdapterBank:
        """The bank of ``key`` (made, with ``capacity`` rows, on first use)."""
        if key.name not in self.vera_banks:
            self.vera_banks[key.name] = AdapterBank(
                key, self.out_features, capacity=capacity, width=1, device=self.device(), dtype=self.vector_dtype()
            )
        return typing.cast(AdapterBank, self.vera_banks[key.name])

    def banks(self) -> list[AdapterBank]:
        """Every bank of this layer."""
        return [typing.cast(AdapterBank, bank) for bank in self.vera_banks.values()]

    def find(self, name: str) -> tuple[AdapterBank, int] | None:
        """The bank and row of adapter ``name`` on this layer, or None when it does not adapt the layer."""
        state = self._state
        spec = state.specs.get(name)
        if spec is None or spec.key.name not in self.vera_banks:
            return None
        bank = typing.cast(AdapterBank, self.vera_banks[spec.key.name])
        slot = state.slots.slot(name)
        return (bank, slot) if bank.holds(slot) else None

    def has_adapter(self, name: str) -> bool:
        """Whether adapter ``name`` adapts this layer."""
        return self.find(name) is not None

    def adapter_names(self) -> list[str]:
        """The adapters on this layer, in slot order."""
        slots = self._state.slots
        return [typing.cast(str, slots.name_at(s)) for bank in self.banks() for s in bank.slots()]

    def rank_of(self, name: str) -> int:
        """This layer's rank for adapter ``name``."""
        bank, slot = self._located(name)
        return bank.ranks[slot]

    def method_of(self, name: str) -> str:
        """``"vera"`` or ``"dvora"``."""
        bank, slot = self._located(name)
        return "dvora" if bank.methods[slot] == DVORA else "vera"

    def vectors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s vectors on this layer by kind (views of the bank rows)."""
        bank, slot = self._located(name)
        kinds = ["lambda_d", "lambda_b"]
        if bank.methods[slot] == DVORA:
            kinds.append("magnitude")
        if bank.own_bias[slot]:
            kinds.append("bias")
        return {kind: bank.row(slot, kind) for kind in kinds}

    def _located(self, name: str) -> tuple[AdapterBank, int]:
        found = self.find(name)
        if found is None:
            raise KeyError(f"adapter {name!r} does not adapt this layer; it has {self.adapter_names()}")
        return found

    def new_row(
        self,
        method: str,
        rank: int,
        *,
        d_initial: float = 0.1,
        tensors: dict[str, torch.Tensor] | None = None,
        own_bias: bool = False,
    ) -> dict[str, Any]:
        """Checked vectors for a new adapter on this layer (from ``tensors`` or initialised), not yet written.

        An initial ``lambda_d`` is the number ``d_initial`` (the bank fills it in); an initial
        ``lambda_b`` is left out (a new row is zero).
        """
        device, dtype = self.device(), self.vector_dtype()
        tensors = tensors or {}
        expected = {"lambda_d": rank, "lambda_b": self.out_features, "magnitude": self.out_features}
        for kind, value in tensors.items():
            if kind == "bias":
                continue
            if kind not in expected or tuple(value.shape) != (expected[kind],):
                raise ValueError(f"{kind} must have shape ({expected.get(kind)},), got {tuple(value.shape)}")
        row: dict[str, Any] = {kind: tensors[kind] for kind in ("lambda_d", "lambda_b") if kind in tensors}
        if method == "dvora":
            magnitude = tensors.get("magnitude")
            if magnitude is None:
                weight = self.frozen_weight("DVoRA")
                magnitude = vc.initial_magnitude(weight.detach(), fan_in_fan_out=self.fan_in_fan_out, dtype=dtype)
            row["magnitude"] = magnitude
        if own_bias:
            bias = tensors.get("bias", self.bias)
            row["bias"] = torch.zeros(self.out_features) if bias is None else bias
            if tuple(row["bias"].shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(row['bias'].shape)}")
        moved = {kind: value.detach().to(device=device, dtype=dtype) for kind, value in row.items()}
        moved.setdefault("lambda_d", float(d_initial))
        return moved

    def add_adapter(
        self,
        slot: int,
        method: str,
        key: ProjectionKey,
        rank: int,
        *,
        d_initial: float = 0.1,
        tensors: dict[str, torch.Tensor] | None = None,
        own_bias: bool = False,
        row: dict[str, Any] | None = None,
    ) -> bool:
        """Write an adapter's vectors into row ``slot`` of ``key``'s bank (the model checked the rest).

        Returns whether the bank was made now (its parameters start frozen).
        """
        if not key.covers(rank, self.in_features, self.out_features):
            raise ValueError(
                f"a layer of {self.in_features} inputs, {self.out_features} outputs and rank {rank} does not fit "
                f"the shared projections (r={key.r}, max_in={key.max_in}, max_out={key.max_out})"
            )
        if row is None:
            row = self.new_row(method, rank, d_initial=d_initial, tensors=tensors, own_bias=own_bias)
        made = key.name not in self.vera_banks
        bank = self.bank(key, self._state.slots.capacity)
        if made:
            bank.freeze()
        spec = self._state.specs.get(self._state.slots.name_at(slot) or "")
        detach = spec is not None and spec.detach_norm
        bank.write(slot, DVORA if method == "dvora" else VERA, rank, **row, detach_norm=detach)
        return made

    def delete_adapter(self, name: str) -> None:
        """Zero adapter ``name``'s rows (it must not be merged)."""
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the weight; unmerge it before deleting it")
        bank, slot = self._located(name)
        bank.clear(slot)
        if not bank.slots():
            del self.vera_banks[bank.key.name]
            self._frozen_cache = {k: v for k, v in self._frozen_cache.items() if k[0] != bank.key.name}

    # ------------------------------------------------------------------ pieces
    def _projections(
        self, key: ProjectionKey, rank: int, dtype: torch.dtype, vector_dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``A_s`` as ``dtype`` (it multiplies the activations), ``B_s`` as the vectors (only folded with them)."""
        store = self._state.projections
        A = store.get(key, dtype, device)[0]
        B = store.get(key, vector_dtype, device)[1]
        shape = lr.AdapterShape(rank, self.out_features, self.in_features)
        return lr.layer_slices(A, B, shape)

    def _step_projections(self, step: _Step, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(A_s^T, B_s^T, A_s, B_s)`` for ``step`` and the activations ``x``, cached on the plan."""
        cache_key = (x.dtype, x.device)
        found = step.projections.get(cache_key)
        if found is None:
            A_s, B_s = self._projections(step.bank.key, step.rank, x.dtype, step.bank.lambda_b.dtype, x.device)
            found = (A_s.T, B_s.T, A_s, B_s)
            if not torch.compiler.is_compiling():
                step.projections[cache_key] = found
        return found

    def _weight_stamp(self) -> tuple[Any, ...]:
        """Changes whenever the frozen weight does (the DVoRA cache key).

        Not the storage address: FSDP2 gathers a sharded weight into new storage at every
        forward, with the same tensor and version.
        """
        if quantized.quantization(self.base_layer) is not None:
            return quantized.state_stamp(self.base_layer)
        weight = self.dense_weight("DVoRA")
        return (id(weight), weight._version, weight.device, weight.dtype, tuple(weight.shape))

    def _frozen(self, key: ProjectionKey, rank: int) -> vc.DvoraFrozen:
        """DVoRA's Gram pieces of the frozen weight, computed once per weight state (and per key, rank)."""
        stamp = self._weight_stamp()
        cached = self._frozen_cache.get((key.name, rank))
        if cached is not None and (torch.compiler.is_compiling() or cached[0] == stamp):
            return cached[1]
        weight = self.frozen_weight("DVoRA")
        A = self._state.projections.get(key, None, weight.device)[0]
        with _no_autocast(weight):  # float32 or wider, as the core computes them, under autocast too
            frozen = vc.dvora_precompute(weight.detach(), A, rank, fan_in_fan_out=self.fan_in_fan_out)
        if not torch.compiler.is_compiling():
            self._frozen_cache[(key.name, rank)] = (stamp, frozen)
        return frozen

    def _plan_steps(self) -> tuple[_Step, ...]:
        """The active, unmerged adapters of this layer, looked up once per change of the model's adapters."""
        state = self._state
        version, steps = self._plan
        if version == state.version:
            return steps
        found = []
        for name in state.active:
            located = self.find(name)
            if located is None or name in self.merged_adapters:
                continue
            bank, slot = located
            spec = state.specs[name]
            rank = bank.ranks[slot]
            found.append(
                _Step(
                    name,
                    bank,
                    slot,
                    torch.tensor([slot], device=bank.lambda_b.device),
                    rank,
                    bank.methods[slot],
                    spec.dropout,
                    spec.detach_norm,
                    bank.own_bias[slot],
                    bank.parameters_by_kind(),
                    bank.capacity == 1 and bank.width == rank,
                    _plain(self.base_layer),
                    merged_from=_merged_from(self.in_features, self.out_features, rank),
                )
            )
        dvora_steps = [s.name for s in found if s.method == DVORA]
        if len(dvora_steps) > 1:
            raise RuntimeError(f"at most one DVoRA adapter can be active on a layer, got {dvora_steps}")
        if dvora_steps and self.merged_adapters:
            raise RuntimeError("a DVoRA adapter cannot run on top of merged adapters; unmerge them first")
        if sum(s.own_bias for s in found) > 1:
            raise RuntimeError("at most one active adapter per layer can train its own bias")
        steps = tuple(sorted(found, key=lambda s: s.method != DVORA))  # the DVoRA adapter first
        if not torch.compiler.is_compiling():
            self._plan = (state.version, steps)
        return steps

    def _rows_of(self, step: _Step, kind: str) -> torch.Tensor:
        """The (1, columns) row of one kind: the parameter itself for a one-row bank, else a sparse gather."""
        param = step.rows[kind]
        if step.whole_row:
            return param
        row = param if param.shape[0] == 1 else functional.embedding(step.index, param, sparse=True)
        return row[:, : step.rank] if kind == "lambda_d" and step.rank < row.shape[1] else row

    def _dropped(self, step: _Step, x: torch.Tensor) -> torch.Tensor:
        if step.dropout == 0.0 or not self.training:
            return x
        return functional.dropout(x, step.dropout, training=True)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base output plus every active, unmerged adapter (or per-row adapters in a mixed batch)."""
        state = self._state
        fast = self._fast
        if (
            fast is not None
            and fast.version == state.version
            and state.rows is None
            and not state.disabled
            and not args
            and not kwargs
            and x.dtype == fast.dtype
            and x.device == fast.device
            and fast.parameters["weight"] is fast.weight
            and (
                fast.weight_version is None
                or torch.compiler.is_compiling()
                or fast.weight._version == fast.weight_version
            )
            and not fast.weight.requires_grad
        ):
            autocast = torch.is_autocast_enabled(fast.device_type)
            if not autocast or torch.get_autocast_dtype(fast.device_type) == x.dtype:
                tokens = x.numel() // self.in_features
                # merging saves r T in more in backward than in forward: below the backward's
                # threshold neither pass merges
                if fast.composed is not None and tokens < fast.step.merged_from[1]:
                    # the same operators in the same order as the general path below: activation
                    # checkpointing recomputes a forward and requires the same graph
                    bias, A_t, B_t, d, b = fast.composed
                    base = functional.linear(x, fast.weight, bias)
                    C_t = lr.fold_row_t(xp, B_t, d, b)
                    return lr.add_product_t(xp, base, lr.project_t(xp, x, A_t), C_t)
                merged = fast.step.merged(tokens)
                if not (autocast and fast.autocast_off):
                    return fast.function(x, *fast.arguments, merged)
                with torch.autocast(fast.device_type, enabled=False):
                    return fast.function(x, *fast.arguments, merged)
        if state.disabled or args or kwargs:
            if not state.disabled and (state.rows is not None or self._plan_steps()):
                raise TypeError("a VeraLinear with adapters takes only the input tensor")
            return self.base_layer(x, *args, **kwargs)
        if state.rows is not None:
            return self._mixed_forward(x, state.rows)
        steps = self._plan[1] if self._plan[0] == state.version else self._plan_steps()
        if not steps:
            return self.base_layer(x)
        dtype = _compute_dtype(x)
        xc = x if x.dtype == dtype else x.to(dtype)
        first = steps[0]
        if len(steps) == 1 and (whole := self._on_weight(first, xc, x)) is not None:
            return whole
        if first.method == DVORA:
            result = self._dvora_forward(first, xc)
            rest = steps[1:]
        else:
            own = next((s for s in steps if s.own_bias), None)
            result = self._base(xc, True if own is None else self._rows_of(own, "bias")[0])
            rest = steps
        for step in rest:
            A_t, B_t = self._step_projections(step, xc)[:2]
            C_t = lr.fold_row_t(xp, B_t, self._rows_of(step, "lambda_d"), self._rows_of(step, "lambda_b"))
            result = lr.add_product_t(xp, result, lr.project_t(xp, self._dropped(step, xc), A_t), C_t)
        return result

    def _on_weight(self, step: _Step, x: torch.Tensor, given: torch.Tensor) -> torch.Tensor | None:
        """The whole layer as one node from the frozen weight (:class:`VeraLinearFunction`,
        :class:`DvoraLinearFunction`), or None where that does not apply.

        It replaces the base layer's own forward, so it needs a plain ``nn.Linear`` or
        transformers ``Conv1D`` base with a frozen floating weight of the activations'
        dtype (any under autocast, which casts it anyway), its bias (or the adapter's own)
        trained or not; and no dropout in effect. VeRA where neither pass merges (few
        tokens) is left to the factored path, whose autograd nodes cost the host less than
        a Python node. ``x`` is ``given`` in the compute dtype; where the two are one tensor
        the step is remembered for the next calls (:class:`_Fast`).
        """
        base = self.base_layer
        if not step.plain or (self.training and step.dropout > 0.0):
            return None
        weight = base._parameters["weight"]
        bias = self._rows_of(step, "bias")[0] if step.own_bias else base._parameters["bias"]
        autocast = torch.is_autocast_enabled(x.device.type)
        if (
            weight is None
            or weight.requires_grad
            or not weight.is_floating_point()
            or (weight.dtype != x.dtype and not autocast)
        ):
            return None
        projections = self._step_projections(step, x)
        d, b = self._rows_of(step, "lambda_d"), self._rows_of(step, "lambda_b")
        arguments: tuple[Any, ...]
        if step.method == DVORA:
            frozen = self._frozen(step.bank.key, step.rank)
            magnitude = self._rows_of(step, "magnitude")
            function = DvoraLinearFunction.apply
            arguments = (weight, bias, *frozen, projections, magnitude, d, b, self.fan_in_fan_out, step.detach_norm)
        else:
            function = VeraLinearFunction.apply
            arguments = (weight, bias, projections, d, b, self.fan_in_fan_out)
        if (
            step.whole_row
            and not step.own_bias
            and step.dropout == 0.0
            and x is given
            and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype)
            and (not autocast or torch.get_autocast_dtype(x.device.type) == x.dtype)
            and not torch.compiler.is_compiling()
        ):
            composed = None
            if step.method != DVORA and type(base) is nn.Linear:
                composed = (bias, projections[0], projections[1], d, b)
            self._fast = _Fast(
                self._state.version,
                x.dtype,
                x.device,
                x.device.type,
                base._parameters,
                weight,
                weight._version if step.method == DVORA else None,
                step,
                function,
                arguments,
                step.method == DVORA,
                composed,
            )
        merged = step.merged(x.numel() // self.in_features)
        if step.method != DVORA and not (merged[0] or merged[1]):
            return None
        with _no_autocast(x):
            return function(x, *arguments, merged)

    def _dvora_forward(self, step: _Step, x: torch.Tensor) -> torch.Tensor:
        """DVoRA factored, autograd through the core's pieces (where :meth:`_on_weight` does not apply).

        A quantized base stays quantized: its own forward gives ``x W0^T`` and the Gram pieces
        come from its dequantized weight once per weight state.
        """
        frozen = self._frozen(step.bank.key, step.rank)
        A_t, B_t = self._step_projections(step, x)[:2]
        d_row, b_row = self._rows_of(step, "lambda_d"), self._rows_of(step, "lambda_b")
        magnitude = self._rows_of(step, "magnitude")
        bias = self._rows_of(step, "bias")[0] if step.own_bias else self.bias
        with _no_autocast(x):
            C_t = lr.fold_row_t(xp, B_t, d_row, b_row)
            norm = _gram_norm(xp, frozen, C_t.T)
            if step.detach_norm:
                norm = norm.detach()
            z = lr.add_product_t(xp, self._base(x, False), lr.project_t(xp, self._dropped(step, x), A_t), C_t)
            return _scaled(xp, z, magnitude, norm, bias)

    # ------------------------------------------------------------------ mixed batches
    def _mixed_forward(self, x: torch.Tensor, rows: BatchRows) -> torch.Tensor:
        """Each batch row uses its own adapter: per bank one gather of rows, no loop over adapters or rows.

        Rows of DVoRA adapters are then scaled by their ``m / n`` and get their bias after it;
        rows of VeRA adapters, and rows of none, by one.
        """
        if x.dim() < 2:
            raise ValueError("a mixed-adapter batch needs inputs of shape (batch, ..., in_features)")
        rows = rows.for_batch(int(x.shape[0]))
        if self.merged_adapters:
            raise RuntimeError("mixed-adapter batches need unmerged adapters; unmerge first")
        banks = self.banks()
        if not banks:
            return self.base_layer(x)
        dtype = _compute_dtype(x)
        xc = x.to(dtype)
        scaled = any(bank.dvora_rows or bank.own_bias_rows for bank in banks)
        result = self._base(xc, not scaled)
        scale = bias_rows = None
        x_rows = xc if rows.dropout is None or not self.training else _row_dropout(xc, rows.dropout)
        with _no_autocast(x):
            for bank in banks:
                d_rows, b_rows = self._gathered(bank, rows, "lambda_d"), self._gathered(bank, rows, "lambda_b")
                if bank.narrow_rows:
                    d_rows = d_rows * bank.mask("rank", d_rows.device)[rows.safe]
                b_rows = b_rows * rows.valid.to(b_rows.dtype)
                A_s, B_s = self._projections(bank.key, bank.width, dtype, b_rows.dtype, x.device)
                result = lr.rows_delta(xp, lr.project(xp, x_rows, A_s, None), B_s, d_rows, b_rows, result)
                if bank.dvora_rows:
                    scale = self._dvora_row_scale(bank, rows, scale)
                if bank.own_bias_rows:
                    bias_rows = self._bias_rows(bank, rows, bias_rows)
            if not scaled:
                return result
            bias: Any = self.bias if bias_rows is None else _per_row(bias_rows, result)
            bias = None if bias is None else bias.to(result.dtype)
            if scale is None:
                return result if bias is None else result + bias
            return _scale_add(xp, result, _per_row(scale, result), bias)

    def _gathered(
        self, bank: AdapterBank, rows: BatchRows, kind: str, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows of one kind for the batch (or ``index``); rows of inactive adapters are used but do not train."""
        gathered = bank.gather(kind, rows.safe if index is None else index)
        if index is None and rows.trainable is not None and gathered.requires_grad:
            gathered = torch.where(rows.trainable, gathered, gathered.detach())
        return gathered

    def _dvora_row_scale(self, bank: AdapterBank, rows: BatchRows, scale: torch.Tensor | None) -> torch.Tensor | None:
        """Per row ``m / n`` of its DVoRA adapter in this bank (one for other rows; None: all ones).

        The norms are computed once per distinct DVoRA adapter of the batch (Gram form), then
        gathered per row.
        """
        device = rows.safe.device
        is_dvora = bank.mask("dvora", device)[rows.safe] & (rows.index >= 0)
        used = torch.unique(rows.safe[is_dvora])
        if used.shape[0] == 0:
            return scale
        d_used = self._gathered(bank, rows, "lambda_d", used)
        if bank.narrow_rows:
            d_used = d_used * bank.mask("rank", device)[used]
        b_used = self._gathered(bank, rows, "lambda_b", used)
        norms = vc.dvora_norm_rows(self._frozen(bank.key, bank.width), _bank_B(self, bank), d_used, b_used)
        detached = bank.mask("detach_norm", device)[used][:, None]
        norms = torch.where(detached, norms.detach(), norms)
        magnitude = self._gathered(bank, rows, "magnitude", used)
        ratio_used = magnitude / norms.to(magnitude.dtype)
        position = torch.searchsorted(used, rows.safe).clamp_max(max(int(used.shape[0]) - 1, 0))
        ratio = torch.where(is_dvora[:, None], ratio_used[position], torch.ones_like(ratio_used[:1]))
        if rows.trainable is not None and ratio.requires_grad:
            ratio = torch.where(rows.trainable, ratio, ratio.detach())
        return ratio if scale is None else scale * ratio

    def _bias_rows(self, bank: AdapterBank, rows: BatchRows, previous: torch.Tensor | None) -> torch.Tensor:
        """Per row the bias: the adapter's own for rows that train one, else the base layer's."""
        own = (bank.mask("own_bias", rows.safe.device)[rows.safe] & (rows.index >= 0))[:, None]
        gathered = self._gathered(bank, rows, "bias")
        fallback = previous
        if fallback is None:
            base = self.bias
            fallback = (torch.zeros_like(gathered[0]) if base is None else base.to(gathered.dtype)).expand_as(gathered)
        return torch.where(own, gathered, fallback)

    # ------------------------------------------------------------------ merging
    def merged_weight(self, names: list[str], *, safe: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weight with ``names`` folded in, and the DVoRA norms to keep (nothing is changed).

        ``safe``: ValueError when the result is not finite or, for DVoRA, cannot be unmerged.
        """
        weight = self.frozen_weight("merging")
        todo = [n for n in names if self.has_adapter(n) and n not in self.merged_adapters]
        if any(self.method_of(n) == "dvora" for n in todo) and (len(todo) > 1 or self.merged_adapters):
            raise RuntimeError("a DVoRA adapter must be merged alone, onto an unmerged weight")
        new = weight.detach()
        norms: dict[str, torch.Tensor] = {}
        for name in todo:
            vectors = {k: v.detach() for k, v in self.vectors(name).items()}
            A, B = self._state.projections.get(self._state.specs[name].key, None, weight.device)
            if self.method_of(name) == "dvora":
                new, norms[name] = vc.dvora_merge(
                    new,
                    A,
                    B,
                    vectors["magnitude"],
                    vectors["lambda_d"],
                    vectors["lambda_b"],
                    fan_in_fan_out=self.fan_in_fan_out,
                    safe=safe,
                )
            else:
                new = vc.merge(
                    new, A, B, vectors["lambda_d"], vectors["lambda_b"], fan_in_fan_out=self.fan_in_fan_out, safe=safe
                )
        return new, norms

    def commit_merge(self, names: list[str], weight: torch.Tensor, norms: dict[str, torch.Tensor]) -> float:
        """Write a weight from :meth:`merged_weight` and record the merge.

        Returns the largest absolute error the write added: 0 for a dense weight (beyond the
        rounding to its dtype), the re-quantization error for a quantized base.
        """
        error = self._write_weight(weight, "merging")
        self._merge_norms.update(norms)
        self.merged_adapters.extend(n for n in names if self.has_adapter(n) and n not in self.merged_adapters)
        self._state.changed()
        return error

    def _write_weight(self, weight: torch.Tensor, purpose: str) -> float:
        self._frozen_cache.clear()
        if quantized.quantization(self.base_layer) is not None:
            return quantized.requantize(self.base_layer, weight)
        with torch.no_grad():
            self.dense_weight(purpose).copy_(weight)
        return 0.0

    def unmerged_weight(self) -> torch.Tensor:
        """The weight with every merge undone (nothing is changed); ValueError if it would not be finite."""
        weight = self.frozen_weight("unmerging")
        new = weight.detach()
        for name in reversed(self.merged_adapters):
            vectors = {k: v.detach() for k, v in self.vectors(name).items()}
            A, B = self._state.projections.get(self._state.specs[name].key, None, weight.device)
            if self.method_of(name) == "dvora":
                new = vc.dvora_unmerge(
                    new,
                    self._merge_norms[name],
                    A,
                    B,
                    vectors["magnitude"],
                    vectors["lambda_d"],
                    vectors["lambda_b"],
                    fan_in_fan_out=self.fan_in_fan_out,
                )
            else:
                new = vc.unmerge(
                    new, A, B, vectors["lambda_d"], vectors["lambda_b"], fan_in_fan_out=self.fan_in_fan_out
                )
        if not bool(torch.isfinite(new).all()):
            raise ValueError("unmerging would write NaN or infinity into the weight; the weight was left as it is")
        return new

    def commit_unmerge(self, weight: torch.Tensor) -> float:
        """Write a weight from :meth:`unmerged_weight` and forget the merges; returns the error added."""
        error = self._write_weight(weight, "unmerging")
        self.merged_adapters.clear()
        self._merge_norms.clear()
        self._state.changed()
        return error

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _bank_B(layer: VeraLinear, bank: AdapterBank) -> torch.Tensor:
    """The shared B of ``bank``'s key in the bank's dtype, on its device (whole: rows slice it)."""
    return layer._state.projections.get(bank.key, bank.lambda_b.dtype, bank.lambda_b.device)[1]


def _row_dropout(x: torch.Tensor, p_rows: torch.Tensor) -> torch.Tensor:
    """Inverted dropout with each leading row's own probability."""
    keep = (1.0 - p_rows).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    return x * torch.bernoulli(keep.expand_as(x)) / keep.clamp_min(torch.finfo(x.dtype).tiny)


def _per_row(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(batch, out) rows broadcast over the tokens of each row of ``like`` (batch, ..., out)."""
    return rows.to(like.dtype).reshape((rows.shape[0],) + (1,) * (like.dim() - 2) + (rows.shape[-1],))
