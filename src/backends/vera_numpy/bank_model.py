"""``BankModel``: many VeRA / DVoRA adapters over one weight dictionary, one row per adapter per layer.

Every adapter takes one slot of a :class:`vera_core.slots.SlotTable`, the same row in
every layer's bank: adding, loading or deleting one costs O(its own size) whatever the
number held (the banks grow geometrically). Adapters of different rank share a bank
(zero-padded ``lambda_d``, exact), and so do VeRA and DVoRA adapters; adapters on
different projection pairs (seeds) have a bank each. ``model.use(names)`` picks an
adapter per batch row (``"__base__"``: none) for the forwards that follow; the layers
(``model.layer(name)``) then serve and train every row with its own adapter, and
:class:`~vera_numpy.BankAdamW` updates only the adapters a step used.

Files are the ordinary vera-core adapter files, one per adapter (:meth:`BankModel.save_adapter`,
:meth:`BankModel.load_adapter`), the same vectors vera_torch writes and reads. A single
adapter also comes out as an :class:`~vera_numpy.AdaptedModel` (:meth:`BankModel.adapter`)
to merge into the weights or train alone.
"""

from __future__ import annotations

import dataclasses
import os
import typing
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

import vera_core as vc
from vera_core.adapter_file import AdapterConfig, AdapterFileError, projection_checksum
from vera_core.slots import ProjectionKey
from vera_numpy import files
from vera_numpy._backend import Backend
from vera_numpy.bank import DVORA, VERA
from vera_numpy.bank_layer import BASE_ADAPTER, BankLinear, BankState, Rows
from vera_numpy.container import Container
from vera_numpy.layers import Layer, Linear
from vera_numpy.weights import (
    BIAS_SUFFIX,
    WEIGHT_SUFFIX,
    AdaptedModel,
    _features,
    checked_layers,
    linear_layers,
    new_config,
)

BANK_BIAS_MODES = ("none", "vera_only")
"""``bias="all"`` trains biases outside the adapted layers, shared by the model: a bank keeps biases per adapter."""


@dataclasses.dataclass(frozen=True)
class _Adapter:
    """An adapter of the bank: its config (as its file records it), pair and slot."""

    config: AdapterConfig
    key: ProjectionKey
    detach_norm: bool


class BankModel(Container):
    """Adapter banks over the dense layers of a weight dictionary.

    Parameters
    ----------
    weights : mapping of str to array
        ``"<layer>.weight"`` (out, in) and optional ``"<layer>.bias"``; never modified.
    fan_in_fan_out : bool
        The weights are stored (in, out).
    backend : Backend, optional
        Default: that of the weights.
    dropout_seed : int
        Layer ``i`` (in the order layers are first adapted) draws its dropout masks from
        stream ``dropout_seed + i``.

    Examples
    --------
    >>> import numpy as np
    >>> import vera_numpy as vn
    >>> rng = np.random.default_rng(0)
    >>> weights = {"fc.weight": rng.standard_normal((3, 4), dtype=np.float32), "fc.bias": np.zeros(3, np.float32)}
    >>> model = vn.BankModel(weights)
    >>> model.add_vera("alice", ["fc"], r=4)
    >>> model.add_vera("bob", ["fc"], r=2, dvora=True)
    >>> model.use(["alice", "bob", "__base__"])
    >>> model.layer("fc").forward(np.ones((3, 4), np.float32)).shape
    (3, 3)
    >>> for name, array in model.parameters().items():  # one bank: an adapter per row, spare rows
    ...     print(name, array.shape)
    fc.threefry2x32_20_0_r4_i4_o3.lambda_d (17, 4)
    fc.threefry2x32_20_0_r4_i4_o3.lambda_b (17, 3)
    fc.threefry2x32_20_0_r4_i4_o3.magnitude (17, 3)
    """

    def __init__(
        self,
        weights: Mapping[str, Any],
        *,
        fan_in_fan_out: bool = False,
        backend: Backend | None = None,
        dropout_seed: int = 0,
    ) -> None:
        if not weights:
            raise ValueError("the weight dictionary is empty")
        self.weights = dict(weights)
        self.backend = Backend.of(next(iter(self.weights.values()))) if backend is None else backend
        self.state = BankState(self.backend, fan_in_fan_out)
        self.fan_in_fan_out = fan_in_fan_out
        self.dropout_seed = dropout_seed
        self.keys: dict[str, ProjectionKey] = {}
        self.key_users: dict[str, int] = {}
        self._adapters: dict[str, _Adapter] = {}
        self._digests: dict[str, str] = {}
        self._listeners: list[Any] = []
        self._frozen_layers: dict[str, Linear] = {}
        self.adapted: dict[str, BankLinear] = {}
        """The adapted layers by name (the same objects as ``children``), in the order first adapted."""
        super().__init__({})
        self.children = typing.cast(dict[str, Layer], self.adapted)  # one dict: layers adapted later are children

    # ------------------------------------------------------------------ queries
    def adapters(self) -> list[str]:
        """The adapters' names, in the order they were added."""
        return list(self._adapters)

    def __len__(self) -> int:
        return len(self._adapters)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def config(self, name: str) -> AdapterConfig:
        """Adapter ``name``'s config, as its file records it (without the projections' checksum)."""
        return self._adapter(name).config

    def _adapter(self, name: str) -> _Adapter:
        found = self._adapters.get(name) if isinstance(name, str) else None
        if found is None:
            shown = list(self._adapters)[:10]
            more = f" and {len(self._adapters) - 10} more" if len(self._adapters) > 10 else ""
            raise KeyError(f"no adapter named {name!r}; the bank holds {shown}{more}")
        return found

    def vectors(self, name: str) -> dict[str, Any]:
        """Adapter ``name``'s vectors under their file names (``"<layer>.lambda_d"``, ...): views of the banks."""
        adapter, slot = self._adapter(name), self.state.slots.slot(name)
        return {
            f"{layer}.{kind}": vector
            for layer in adapter.config.layers
            for kind, vector in self.adapted[layer].banks[adapter.key.name].vectors(slot).items()
        }

    def load_vectors(self, name: str, values: Mapping[str, Any]) -> None:
        """Copy ``values`` (file names: ``"<layer>.lambda_d"``, ...) into adapter ``name``'s rows, in place.

        Every name and shape is checked before anything is written.
        """
        current = self.vectors(name)
        unknown = sorted(set(values) - set(current))
        if unknown:
            raise KeyError(f"adapter {name!r} has no vectors {unknown[:10]}; it has {sorted(current)[:10]}")
        for key, value in values.items():
            if tuple(value.shape) != tuple(current[key].shape):
                raise ValueError(f"{key!r} has shape {tuple(current[key].shape)}, got {tuple(value.shape)}")
        adapter, slot = self._adapter(name), self.state.slots.slot(name)
        xp = self.backend.xp
        for key, value in values.items():
            layer, kind = key.rsplit(".", 1)
            array = self.adapted[layer].banks[adapter.key.name].arrays[kind]
            array[slot, : value.shape[0]] = xp.astype(value, array.dtype)

    def layer(self, name: str) -> Layer:
        """The layer ``name``: its bank layer, or a frozen :class:`Linear` for a dense layer no adapter adapts."""
        if name in self.adapted:
            return self.adapted[name]
        if name not in self._frozen_layers:
            if name not in linear_layers(self.weights):
                raise KeyError(
                    f"no dense layer {name!r} in the weights; dense layers: {', '.join(linear_layers(self.weights))}"
                )
            self._frozen_layers[name] = Linear(
                self.weights[name + WEIGHT_SUFFIX],
                self.weights.get(name + BIAS_SUFFIX),
                trainable=False,
                fan_in_fan_out=self.fan_in_fan_out,
            )
        return self._frozen_layers[name]

    # ------------------------------------------------------------------ rows
    def index(self, names: Sequence[str]) -> np.ndarray:
        """The slot of each adapter name (``"__base__"``: -1), a host array to pass to :meth:`use`.

        Examples
        --------
        >>> import numpy as np
        >>> model = BankModel({"fc.weight": np.ones((3, 4), np.float32)})
        >>> model.add_vera("a", ["fc"], r=2)
        >>> model.index(["a", "__base__"]).tolist()
        [0, -1]
        """
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise TypeError(f"names must be a list of adapter names (one per row), got {names!r}")
        slots = self.state.slots
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in slots})
        if unknown:
            raise KeyError(f"unknown adapters {unknown[:10]}; the bank holds {len(slots)} adapters")
        return np.asarray([-1 if n == BASE_ADAPTER else slots.slot(n) for n in names], dtype=np.int64)

    def use(self, names: str | Sequence[str] | Any) -> None:
        """Pick the adapter of each batch row for the forwards that follow.

        Parameters
        ----------
        names : str, list of str, or integer array
            One adapter name for every row of any batch; one name per row
            (``"__base__"`` for none); or the slots of :meth:`index` (the hot path: no
            name lookups). The choice is turned into index arrays here, once, not in every
            layer.
        """
        state = self.state
        if isinstance(names, str):
            slot = -1 if names == BASE_ADAPTER else self.index([names])[0]
            state.rows, state.broadcast, state._broadcast_rows = None, int(slot), {}
            return
        if isinstance(names, Sequence):
            slots = self.index(names)
        else:
            slots = np.asarray(self.backend.to_host(names))
            if slots.ndim != 1 or not np.issubdtype(slots.dtype, np.integer):
                raise ValueError(
                    f"an adapter index must be a 1-D integer array of slots, got {slots.dtype} {slots.shape}"
                )
            held = np.asarray([state.slots.name_at(int(s)) is not None for s in np.unique(slots) if s >= 0], dtype=bool)
            if np.any(slots < -1) or not np.all(held):
                raise ValueError("the adapter index names slots that hold no adapter; make it with model.index(names)")
            slots = slots.astype(np.int64)
        rates = np.asarray(state.dropout, dtype=np.float32)
        dropout = np.where(slots >= 0, rates[np.maximum(slots, 0)], 0.0).astype(np.float32) if rates.size else None
        state.rows, state.broadcast = Rows.of(self.backend, slots, dropout), None

    # ------------------------------------------------------------------ adding
    def add_vera(
        self,
        name: str,
        target_modules: str | Sequence[str],
        *,
        r: int = 256,
        seed: int = 0,
        d_initial: float = 0.1,
        dvora: bool = False,
        bias: str = "none",
        dropout: float = 0.0,
        detach_norm: bool = False,
        layers_to_transform: int | Sequence[int] | None = None,
        layers_pattern: str | Sequence[str] | None = None,
    ) -> None:
        """Add a new adapter ``name`` (as :func:`vera_numpy.add_vera` makes one); O(its size).

        The adapter reuses a pair of the same seed whose rank and sizes cover it (its
        layers then take the leading ``r`` rows and columns, and its file records the
        pair's rank), as vera_torch does; else a new pair is generated.

        Raises
        ------
        ValueError
            A bad argument, a taken name, ``bias="all"``, a layer without the bias
            ``bias`` trains, or targets matching nothing; raised before anything changes.
        """
        self._check_new_name(name)
        if bias not in BANK_BIAS_MODES:
            raise ValueError(f"a bank keeps biases per adapter: bias must be one of {BANK_BIAS_MODES}, got {bias!r}")
        for label, value in (("dvora", dvora), ("detach_norm", detach_norm)):
            if not isinstance(value, bool):
                raise ValueError(f"{label} must be a bool, got {value!r}")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if isinstance(d_initial, bool) or not isinstance(d_initial, int | float) or not np.isfinite(d_initial):
            raise ValueError(f"d_initial must be a finite number, got {d_initial!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        config = new_config(
            self.weights,
            target_modules,
            r=r,
            seed=seed,
            d_initial=float(d_initial),
            dvora=dvora,
            bias=bias,
            dropout=float(dropout),
            fan_in_fan_out=self.fan_in_fan_out,
            detach_norm=detach_norm,
            layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern,
        )
        self._check_biases(config)
        assert config.max_in is not None
        key = self._find_key(vc.PRNG_ID, seed, r, config.max_in, config.max_out)
        pair = None
        if key is None:
            key = ProjectionKey(vc.PRNG_ID, seed, r, config.max_in, config.max_out)
            pair = files.projections(config, self.backend)
        config = dataclasses.replace(
            config,
            r=key.r,
            max_in=key.max_in,
            max_out=key.max_out,
            extra={"detach_norm": detach_norm, "requested_r": r, "framework": "numpy"},
        )
        self._attach(name, config, key, pair, {}, detach_norm)

    def load_adapter(self, path: str | os.PathLike[str], name: str, *, max_bytes: int | None = None) -> AdapterConfig:
        """Add the adapter in the vera-core file ``path`` as ``name``; returns its config.

        The file is checked whole before the bank changes (its tensors, each layer against
        the weights, the projections against their checksum). A pair already held is
        reused. Raises AdapterFileError when the file does not fit, or trains biases
        outside its layers (``bias="all"``: the bank keeps biases per adapter).
        """
        self._check_new_name(name)

        def widest_input(config: AdapterConfig) -> int:  # sizes regenerated projections of a PEFT folder
            return max(
                _features(self.weights[layer + WEIGHT_SUFFIX], spec.fan_in_fan_out)[1]
                for layer, spec in checked_layers(self.weights, config).items()
            )

        adapter, vectors, A, B = files.load(path, self.backend, widest_input, max_bytes=max_bytes)
        config = adapter.config
        if config.max_in is None:
            config = dataclasses.replace(config, max_in=int(A.shape[1]))
        if config.bias_modules:
            raise AdapterFileError(
                f"{path} trains biases outside its adapted layers ({', '.join(config.bias_modules)}; bias='all'), "
                "which every adapter of a bank would share; load it alone with vera_numpy.AdaptedModel.load"
            )
        config = dataclasses.replace(config, layers=checked_layers(self.weights, config))
        if any(spec.fan_in_fan_out != self.fan_in_fan_out for spec in config.layers.values()):
            raise AdapterFileError(f"{path}: its weight layout differs from the bank's (fan_in_fan_out)")
        self._check_biases(config)
        assert config.max_in is not None
        key = ProjectionKey(config.prng_id, config.seed, config.r, config.max_in, config.max_out)
        digest = config.projections_sha256 or projection_checksum(self.backend.to_host(A), self.backend.to_host(B))
        if digest != self._digest(key):
            key = key._replace(checksum=digest)  # a pair our generator does not make: held under its checksum
        pair = None if key.name in self.keys else (A, B)
        self._attach(name, config, key, pair, vectors, config.detach_norm)
        return config

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name.isidentifier() or name == BASE_ADAPTER:
            raise ValueError(f"an adapter name must be a Python identifier other than {BASE_ADAPTER!r}, got {name!r}")
        if name in self._adapters:
            raise ValueError(f"the bank already holds an adapter named {name!r}; delete it or pick another name")

    def _check_biases(self, config: AdapterConfig) -> None:
        if config.bias == "none":
            return
        missing = [layer for layer in config.layers if layer + BIAS_SUFFIX not in self.weights]
        if missing:
            raise ValueError(f"bias={config.bias!r} trains the bias of {missing}, which the weights lack")

    def _find_key(self, prng_id: str, seed: int, r: int, max_in: int, max_out: int) -> ProjectionKey | None:
        for key in self.keys.values():
            if key.prng_id == prng_id and key.seed == seed and key.checksum is None and key.covers(r, max_in, max_out):
                return key
        return None

    def _digest(self, key: ProjectionKey) -> str | None:
        """The checksum of the pair our generator makes for ``key`` (None for another generator)."""
        if key.prng_id != vc.PRNG_ID:
            return None
        if key.name not in self._digests:
            A, B = vc.generate_projections(key.seed, key.r, key.max_in, key.max_out, xp=np, dtype=np.float32)
            self._digests[key.name] = projection_checksum(A, B)
        return self._digests[key.name]

    def _attach(
        self,
        name: str,
        config: AdapterConfig,
        key: ProjectionKey,
        pair: tuple[Any, Any] | None,
        vectors: dict[str, Any],
        detach_norm: bool,
    ) -> None:
        """Write a checked adapter into a slot of every bank it adapts (nothing left to fail but memory)."""
        state, xp = self.state, self.backend.xp
        method = DVORA if config.method == "dvora" else VERA
        rows = {}
        for layer in config.layers:
            rows[layer] = {
                "lambda_d": vectors.get(f"{layer}.lambda_d", config.d_initial),
                "lambda_b": vectors.get(f"{layer}.lambda_b"),
                "magnitude": vectors.get(f"{layer}.magnitude") if method == DVORA else None,
                "bias": vectors.get(f"{layer}.bias", self.weights.get(layer + BIAS_SUFFIX))
                if config.bias != "none"
                else None,
            }
        if pair is not None:
            self.keys[key.name] = key
            state.pairs[key.name] = (xp.asarray(pair[0], copy=True), xp.asarray(pair[1], copy=True))
        self._grow(state.slots.next_capacity())
        slot = state.slots.add(name)
        for layer, spec in config.layers.items():
            bank_layer = self.adapted.get(layer)
            if bank_layer is None:
                bank_layer = self.adapted[layer] = BankLinear(
                    self.weights[layer + WEIGHT_SUFFIX],
                    self.weights.get(layer + BIAS_SUFFIX),
                    state,
                    seed=(self.dropout_seed + len(self.adapted)) % 2**32,
                )
            row = rows[layer]
            if method == DVORA and row["magnitude"] is None:
                row["magnitude"] = bank_layer.initial_magnitude()
            bank_layer.bank(key, state.slots.capacity).write(
                slot, method, spec.rank, detach_norm=detach_norm and method == DVORA, **row
            )
        state.dropout[slot] = config.dropout
        self._adapters[name] = _Adapter(config, key, detach_norm)
        self.key_users[key.name] = self.key_users.get(key.name, 0) + 1
        for listener in list(self._listeners):
            callback = listener()
            if callback is None:
                self._listeners.remove(listener)
            else:
                callback(slot)

    def _grow(self, capacity: int) -> None:
        state = self.state
        if capacity > state.slots.capacity:
            for layer in self.adapted.values():
                for bank in layer.banks.values():
                    bank.grow(capacity)
            state.dropout.extend([0.0] * (capacity - len(state.dropout)))
            state.slots.reserve(capacity)

    def reserve(self, adapters: int) -> None:
        """Make room for ``adapters`` adapters in all (every bank then holds that many rows); never shrinks."""
        if not isinstance(adapters, int) or isinstance(adapters, bool) or adapters <= 0:
            raise ValueError(f"adapters must be a positive int, got {adapters!r}")
        self._grow(adapters)

    def on_new_row(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(slot)`` whenever an adapter is written into a slot (optimisers reset their state there).

        Held by weak reference: a bound method's object may go away.
        """
        self._listeners.append(weakref.WeakMethod(callback) if hasattr(callback, "__self__") else weakref.ref(callback))

    # ------------------------------------------------------------------ removing, files, single adapters
    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``: its rows are zeroed and its slot is free; O(its size)."""
        adapter = self._adapter(name)
        slot = self.state.slots.slot(name)
        for layer in adapter.config.layers:
            bank_layer = self.adapted[layer]
            bank_layer.banks[adapter.key.name].clear(slot)
            bank_layer.drop_empty_banks()
        self.state.slots.remove(name)
        self.state.dropout[slot] = 0.0
        del self._adapters[name]
        self.key_users[adapter.key.name] -= 1
        if not self.key_users[adapter.key.name]:
            del self.key_users[adapter.key.name], self.keys[adapter.key.name]
            del self.state.pairs[adapter.key.name]
        if self.state.rows is not None or self.state.broadcast is not None:
            self.state.rows, self.state.broadcast = None, None  # the selection may name the deleted slot

    def save_adapter(self, path: str | os.PathLike[str], name: str, *, save_projections: bool = False) -> AdapterConfig:
        """Write adapter ``name`` as an ordinary vera-core adapter file; returns its config.

        Projections loaded under a checksum (not ours to regenerate) are always stored.
        """
        adapter = self._adapter(name)
        A, B = self.state.pairs[adapter.key.name]
        store = save_projections or adapter.key.checksum is not None
        files.save(path, adapter.config, self.vectors(name), A, B, self.backend, save_projections=store)
        return adapter.config

    def adapter(self, name: str) -> AdaptedModel:
        """Adapter ``name`` alone as an :class:`AdaptedModel` (a copy): merge it, or train it alone."""
        adapter = self._adapter(name)
        A, B = self.state.pairs[adapter.key.name]
        single = AdaptedModel(self.weights, adapter.config, A, B, backend=self.backend, detach_norm=adapter.detach_norm)
        single.load_parameters(self.vectors(name))
        return single
