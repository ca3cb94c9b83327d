"""Model surgery and adapter management: :func:`add_vera` and friends.

The model is changed in place: each targeted layer is replaced by a
:class:`~vera_torch.layers.VeraLinear` wrapping it, and the model gains an attribute
``vera_state`` holding the shared projections and the adapter bank's bookkeeping
(:class:`vera_core.slots.SlotTable`: every adapter is one row of every layer's bank).
Adding, deleting or switching adapters costs O(the adapter's own size) plus O(layers),
whatever the number of adapters already held. ``model(x, adapter_names=[...])`` picks an
adapter per batch row (``"__base__"`` for none), or takes the slot tensor of
:func:`adapter_index` for the hot path.

Every function that changes the model checks everything first: an exception leaves the
model as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

import vera_core as vc
from vera_core.targets import ALL_LINEAR, matches, select_targets
from vera_torch import quantized
from vera_torch.bank import DVORA, AdapterBank
from vera_torch.layers import BASE_ADAPTER, AdapterSpec, BatchRows, SharedState, VeraLinear, layer_dims
from vera_torch.projections import ProjectionKey, ProjectionStore, generate

__all__ = [
    "STATE_NAME",
    "AdapterSettings",
    "TrainableReport",
    "VeraState",
    "active_adapters",
    "adapter_index",
    "adapter_names",
    "add_vera",
    "delete_adapter",
    "disable_adapters",
    "get_state",
    "list_adapters",
    "merge_adapter",
    "merge_and_unload",
    "reserve",
    "set_adapter",
    "trainable_parameters",
    "unmerge_adapter",
    "vera_layers",
]

STATE_NAME = "vera_state"
"""Name of the attribute :func:`add_vera` adds to the model."""

BIAS_MODES = ("none", "all", "vera_only")


@dataclasses.dataclass(frozen=True, slots=True)
class AdapterSettings:
    """How an adapter was created (what the adapter file records)."""

    name: str
    method: str
    r: int
    key: ProjectionKey
    layers: tuple[str, ...]
    d_initial: float = 0.1
    dropout: float = 0.0
    bias: str = "none"
    target_modules: Any = None
    detach_norm: bool = False


class VeraState:
    """The model-wide part of the adapters: projections, slots, settings, active adapters.

    A plain attribute ``model.vera_state``, not a submodule: containers such as
    ``nn.Sequential`` iterate their submodules, and the projections must stay out of
    ``state_dict()`` and DDP's broadcasts.
    """

    def __init__(self) -> None:
        self.projections = ProjectionStore()
        self.shared = SharedState(self.projections)
        self.settings: dict[str, AdapterSettings] = {}
        self.key_users: dict[str, int] = {}
        """Adapters per projection key (a pair is dropped when its last adapter is deleted)."""
        self._interned: dict[Any, Any] = {}
        self._hooks: list[Any] = []
        self._call_rows = False

    def __repr__(self) -> str:
        return f"VeraState(adapters={len(self.settings)}, active={self.shared.active})"

    def intern(self, value: Any) -> Any:
        """One shared object per distinct value (layer tuples, specs: thousands of adapters share them).

        Unhashable values are kept as they are.
        """
        try:
            return self._interned.setdefault(value, value)
        except TypeError:
            return value

    @property
    def slots(self) -> Any:
        """The model's :class:`vera_core.slots.SlotTable`."""
        return self.shared.slots


def get_state(model: nn.Module) -> VeraState:
    """The model's :class:`VeraState`; raises ValueError when it has no adapters."""
    state = getattr(model, STATE_NAME, None)
    if not isinstance(state, VeraState):
        raise ValueError("this model has no VeRA adapters; call vera_torch.add_vera(model, ...) first")
    return state


def _check_adapter(state: VeraState, name: str) -> AdapterSettings:
    if not isinstance(name, str) or name not in state.settings:
        shown = sorted(state.settings)[:10]
        more = f" and {len(state.settings) - 10} more" if len(state.settings) > 10 else ""
        raise KeyError(f"no adapter named {name!r}; the model has {shown}{more}")
    return state.settings[name]


def vera_layers(model: nn.Module) -> dict[str, VeraLinear]:
    """Every :class:`VeraLinear` of the model by module path."""
    return {name: module for name, module in model.named_modules() if isinstance(module, VeraLinear)}


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    return list(get_state(model).settings)


def _output_head_names(model: nn.Module) -> set[str]:
    heads = set()
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name.split(".")[-1] == "lm_head":
            heads.add(name)
    return heads


def candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Adaptable modules by path, in ``named_modules`` order: wrapped layers by their wrapper path.

    A :class:`VeraLinear`'s own submodules (its base layer, its banks) are not candidates;
    the walk does not enter them, so it costs O(modules) whatever the adapters.
    """
    out: dict[str, nn.Module] = {}
    seen: set[int] = {id(model)}
    stack: list[tuple[str, nn.Module]] = [
        (name, child) for name, child in reversed(model._modules.items()) if child is not None
    ]
    while stack:  # pre-order, as named_modules
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out[path] = module
        if not isinstance(module, VeraLinear):
            stack.extend(
                (f"{path}.{name}", child) for name, child in reversed(module._modules.items()) if child is not None
            )
    return out


def _check_common(r: int, seed: int, d_initial: float, dropout: float, bias: str) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if isinstance(d_initial, bool) or not isinstance(d_initial, (int, float)) or not math.isfinite(d_initial):
        raise ValueError(f"d_initial must be a finite number, got {d_initial!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")


def _model_device(modules: Iterable[nn.Module]) -> torch.device:
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            return tensor.device
    return torch.device("cpu")


def _resolve_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    layers_to_transform: int | Sequence[int] | None,
    layers_pattern: str | Sequence[str] | None,
) -> dict[str, nn.Module]:
    if target_modules is None:
        raise ValueError("target_modules is required: a list of layer names, a regular expression, or 'all-linear'")
    found = candidates(model)
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        heads = _output_head_names(model)
        names = [n for n, m in found.items() if layer_dims(m) is not None and n not in heads]
        if layers_to_transform is not None:
            names = [
                n
                for n in names
                if matches(n, [n], layers_to_transform=layers_to_transform, layers_pattern=layers_pattern)
            ]
        chosen = select_targets(names, ALL_LINEAR)
    else:
        chosen = select_targets(
            found, target_modules, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern
        )
    bad = [f"{n} ({type(found[n]).__name__})" for n in chosen if layer_dims(found[n]) is None]
    if bad:
        raise ValueError(
            f"target_modules={target_modules!r} matches layers that are not linear-like: {', '.join(bad)}; "
            "VeRA adapts nn.Linear, transformers Conv1D and modules with in_features/out_features"
        )
    return {n: found[n] for n in chosen}


def _ensure_state(model: nn.Module) -> VeraState:
    state = getattr(model, STATE_NAME, None)
    if isinstance(state, VeraState):
        return state
    state = VeraState()
    setattr(model, STATE_NAME, state)
    state._hooks.append(model.register_forward_pre_hook(_take_adapter_names, with_kwargs=True))
    state._hooks.append(model.register_forward_hook(_clear_adapter_names, always_call=True))
    return state


def check_dvora_targets(targets: dict[str, nn.Module], source: str) -> None:
    """TypeError unless every target has a dense floating-point or a known quantized weight (DVoRA needs W0)."""
    for path, module in targets.items():
        base = module.base_layer if isinstance(module, VeraLinear) else module
        weight = getattr(base, "weight", None)
        dense = isinstance(weight, torch.Tensor) and weight.is_floating_point()
        if not dense and quantized.quantization(base) is None:
            raise TypeError(
                f"{source}DVoRA needs a dense floating-point weight or a bitsandbytes 4-/8-bit one, "
                f"but layer {path!r} ({type(base).__name__}) has neither"
            )


def _sharded(model: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) already shards part of the model."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def _check_state_attribute(model: nn.Module) -> None:
    state = getattr(model, STATE_NAME, None)
    if state is not None and not isinstance(state, VeraState):
        raise ValueError(f"the model already has an attribute {STATE_NAME!r} that is not a VeraState")


def _model_vector_device(state: VeraState, model: nn.Module) -> torch.device:
    for layer in vera_layers(model).values():
        return layer.device()
    return torch.device("cpu")


def _batch_rows(model: nn.Module, state: VeraState, names: Any) -> BatchRows:
    """The per-row choice of a forward: slots from names (checked) or a slot tensor (the hot path)."""
    shared = state.shared
    device = _model_vector_device(state, model)
    if isinstance(names, torch.Tensor):
        if names.dim() != 1 or names.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"an adapter index must be a 1-D integer tensor of slots, got {names.dtype} {tuple(names.shape)}"
            )
        index = names.to(device=device, dtype=torch.int64)
        active = torch.zeros(shared.slots.capacity, dtype=torch.bool, device=device)
        active_slots = [shared.slots.slot(n) for n in shared.active]
        active[active_slots] = True
        trainable = active[index.clamp_min(0)][:, None] if torch.is_grad_enabled() else None
        dropout = _dropout_rows_from_slots(state, index, device)
        return BatchRows.of(index, dropout, trainable)
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"adapter_names must be a list of adapter names (one per row) or a slot tensor, got {names!r}")
    slots = shared.slots
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in slots})
    if unknown:
        raise ValueError(f"adapter_names has unknown adapters {unknown[:10]}; the model has {len(slots)} adapters")
    if shared.disabled:
        raise RuntimeError("adapters are disabled; leave the disable_adapters() context for a mixed batch")
    index_list = [-1 if n == BASE_ADAPTER else slots.slot(n) for n in names]
    index = torch.tensor(index_list, dtype=torch.int64, device=device)
    active_names = set(shared.active)
    flags = [n == BASE_ADAPTER or n in active_names for n in names]
    trainable = None if all(flags) else torch.tensor(flags, device=device)[:, None]
    probabilities = [0.0 if n == BASE_ADAPTER else shared.specs[n].dropout for n in names]
    dropout = torch.tensor(probabilities, device=device) if any(probabilities) else None
    return BatchRows.of(index, dropout, trainable)


def _dropout_rows_from_slots(state: VeraState, index: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    rates = {n: s.dropout for n, s in state.shared.specs.items() if s.dropout}
    if not rates:
        return None
    table = torch.zeros(state.slots.capacity + 1, device=device)
    for name, rate in rates.items():
        table[state.slots.slot(name)] = rate
    return table[index]  # index -1 reads the spare last entry, 0


def adapter_index(model: nn.Module, names: Sequence[str]) -> torch.Tensor:
    """The slot tensor for per-row adapter ``names`` (``"__base__"``: -1), to pass as ``adapter_names``.

    Converting once and reusing the tensor keeps name lookups out of the serving loop.

    Examples
    --------
    >>> from torch import nn
    >>> model = add_vera(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2)
    >>> adapter_index(model, ["default", "__base__"]).tolist()
    [0, -1]
    """
    state = get_state(model)
    return _batch_rows(model, state, list(names)).index


def _take_adapter_names(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    names = kwargs.pop("adapter_names", None)
    state: VeraState = getattr(module, STATE_NAME)
    if names is not None:
        state.shared.rows = _batch_rows(module, state, names)
        state._call_rows = True
    return args, kwargs


def _clear_adapter_names(module: nn.Module, args: tuple, output: Any) -> None:
    state: VeraState = getattr(module, STATE_NAME)
    if state._call_rows:
        state.shared.rows = None
        state._call_rows = False


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _set_trainable(model: nn.Module, state: VeraState, layers: Iterable[VeraLinear] | None = None) -> None:
    """Freeze everything but the banks holding active adapters (and biases where an adapter asks).

    ``bias="all"`` trains every bias of the model except those an active adapter replaces
    with its own (an adapted layer's). Costs O(parameters of the model + active adapters x
    layers), not O(adapters held).
    """
    shared = state.shared
    all_layers = list(vera_layers(model).values() if layers is None else layers)
    _set_trainable_banks(state, all_layers)
    train_all = "all" in {state.settings[n].bias for n in shared.active} and not shared.disabled
    replaced = {
        id(layer.bias)
        for layer in all_layers
        if layer.bias is not None and any(layer.has_adapter(n) and "bias" in layer.vectors(n) for n in shared.active)
    }
    for name, param in model.named_parameters():
        if ".vera_banks." in f".{name}":
            continue
        param.requires_grad_(train_all and name.split(".")[-1] == "bias" and id(param) not in replaced)


def check_new_name(model: nn.Module, adapter_name: str) -> None:
    """Raise ValueError when ``adapter_name`` is taken or not an identifier."""
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier() or adapter_name == BASE_ADAPTER:
        raise ValueError(f"adapter_name must be a Python identifier other than {BASE_ADAPTER!r}, got {adapter_name!r}")
    _check_state_attribute(model)
    state = getattr(model, STATE_NAME, None)
    if isinstance(state, VeraState) and adapter_name in state.settings:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; delete it or pick another name")


def _grow(model: nn.Module, state: VeraState, capacity: int) -> None:
    """Make every bank hold ``capacity`` rows (amortised: the slot table grows geometrically)."""
    if capacity > state.slots.capacity:
        for layer in vera_layers(model).values():
            for bank in layer.banks():
                bank.grow(capacity)
        state.slots.reserve(capacity)


def reserve(model: nn.Module, adapters: int) -> None:
    """Make room for ``adapters`` adapters in all: every bank then holds exactly that many rows.

    Adding adapters one by one grows the banks geometrically (at most ~5% spare rows); a bulk
    load or a pager that knows its size reserves it once instead. Never shrinks.

    Examples
    --------
    >>> from torch import nn
    >>> model = add_vera(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2)
    >>> reserve(model, 100); model.vera_state.slots.capacity
    100
    """
    if not isinstance(adapters, int) or isinstance(adapters, bool) or adapters <= 0:
        raise ValueError(f"adapters must be a positive int, got {adapters!r}")
    _grow(model, get_state(model), adapters)


@dataclasses.dataclass
class PreparedAdapter:
    """A checked adapter ready to attach: nothing is left that can fail but memory."""

    settings: AdapterSettings
    targets: dict[str, nn.Module]
    ranks: dict[str, int]
    rows: dict[str, dict[str, torch.Tensor]]
    projections: tuple[torch.Tensor, torch.Tensor] | None
    own_bias: bool


def prepare(
    model: nn.Module,
    targets: dict[str, nn.Module],
    settings: AdapterSettings,
    *,
    ranks: dict[str, int] | None = None,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    projections: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> PreparedAdapter:
    """Check an adapter against the model and build its rows; the model is not changed."""
    check_new_name(model, settings.name)
    if settings.method == "dvora":
        check_dvora_targets(targets, "")
    state = getattr(model, STATE_NAME, None)
    key = settings.key
    known = isinstance(state, VeraState) and key.name in state.projections.keys_by_name
    if projections is None and not known:
        projections = generate(key, device=_model_device(targets.values()))
    elif projections is not None:
        A, B = projections
        if tuple(A.shape) != (key.r, key.max_in) or tuple(B.shape) != (key.max_out, key.r):
            raise ValueError(
                f"projections of shape {tuple(A.shape)} and {tuple(B.shape)} do not match "
                f"r={key.r}, max_in={key.max_in}, max_out={key.max_out}"
            )
    own_bias = settings.bias != "none"
    rows: dict[str, dict[str, torch.Tensor]] = {}
    layer_ranks: dict[str, int] = {}
    for path, module in targets.items():
        rank = (ranks or {}).get(path, settings.r)
        n_in, n_out, _ = typing.cast(tuple[int, int, bool], layer_dims(module))
        if not key.covers(rank, n_in, n_out):
            raise ValueError(
                f"layer {path!r} ({n_in} inputs, {n_out} outputs, rank {rank}) does not fit the shared "
                f"projections (r={key.r}, max_in={key.max_in}, max_out={key.max_out})"
            )
        layer = module if isinstance(module, VeraLinear) else _detached_wrapper(module)
        layer_tensors = (tensors or {}).get(path)
        if own_bias and layer.bias is None and not (layer_tensors and "bias" in layer_tensors):
            raise ValueError(f"bias={settings.bias!r} trains the bias of layer {path!r}, which has none")
        try:
            rows[path] = layer.new_row(
                settings.method, rank, d_initial=settings.d_initial, tensors=layer_tensors, own_bias=own_bias
            )
        except (TypeError, ValueError) as error:
            raise type(error)(f"layer {path!r}: {error}") from error
        layer_ranks[path] = rank
    return PreparedAdapter(settings, targets, layer_ranks, rows, projections, own_bias)


def _detached_wrapper(module: nn.Module) -> VeraLinear:
    """A throwaway wrapper to compute a plain layer's rows with (it does not attach to ``module``'s model)."""
    return VeraLinear(module, SharedState(ProjectionStore()))


def attach(model: nn.Module, prepared: PreparedAdapter, *, activate: bool | None = None) -> None:
    """Attach a :func:`prepare`-d adapter (internal: :func:`add_vera` and the loaders).

    ``activate`` None makes it active when it is the model's first adapter.
    """
    state = _ensure_state(model)
    settings = state.intern(prepared.settings)
    key = settings.key
    device = _model_device(prepared.targets.values())
    state.projections.add(key, device=device, tensors=prepared.projections)
    _grow(model, state, state.slots.next_capacity())
    slot = state.slots.add(settings.name)
    state.shared.specs[settings.name] = state.intern(
        AdapterSpec(settings.method, key, settings.dropout, settings.detach_norm)
    )
    state.settings[settings.name] = settings
    state.key_users[key.name] = state.key_users.get(key.name, 0) + 1
    serve_only = _sharded(model)
    for path, module in prepared.targets.items():
        base = module.base_layer if isinstance(module, VeraLinear) else module
        if quantized.quantization(base) is not None:
            quantized.restore_training_layout(base)  # bitsandbytes' CPU repacking cannot train
        layer = module if isinstance(module, VeraLinear) else VeraLinear(module, state.shared)
        if (
            layer.add_adapter(
                slot, settings.method, key, prepared.ranks[path], row=prepared.rows[path], own_bias=prepared.own_bias
            )
            and serve_only
        ):
            # made after fully_shard: outside FSDP's groups, its gradients would never be reduced
            layer.bank(key, state.slots.capacity).trainable = False
        if layer is not module:
            _replace(model, path, layer)
    if activate or (activate is None and not state.shared.active):
        state.shared.active.append(settings.name)
        _set_trainable(model, state)  # a new bank starts frozen, so an inactive adapter changes nothing
    state.shared.changed()


def _set_trainable_banks(state: VeraState, layers: Iterable[VeraLinear]) -> None:
    """:func:`_set_trainable` for the banks of ``layers`` only (a new inactive adapter: O(its layers))."""
    shared = state.shared
    active_slots = [shared.slots.slot(n) for n in shared.active]
    for layer in layers:
        for bank in layer.banks():
            wanted = bank.trainable and not shared.disabled and bank.holds_any(active_slots)
            for param in bank.parameters_by_kind().values():
                param.requires_grad_(wanted)


def add_vera(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    r: int = 256,
    seed: int = 0,
    d_initial: float = 0.1,
    dropout: float = 0.0,
    bias: str = "none",
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    dvora: bool = False,
    adapter_name: str = "default",
    *,
    detach_norm: bool = False,
) -> nn.Module:
    """Add a VeRA (or DVoRA) adapter to ``model`` in place and return the model.

    Parameters
    ----------
    model : nn.Module
        Any model; its targeted layers are wrapped in :class:`~vera_torch.layers.VeraLinear`.
    target_modules : str or list of str
        Layer names (a name or a ``.``-suffix of the module path), a regular expression
        matching the whole path, or ``"all-linear"`` (every linear-like layer but the
        output head), as in PEFT.
    r : int
        Rank. When the model already holds a pair from the same ``seed`` with rank
        ``>= r`` covering these layers, the adapter slices it (leading rows/columns).
    seed : int
        Seed of the shared projections (Threefry, identical on every device).
    d_initial : float
        Initial value of ``lambda_d`` (``lambda_b`` starts at zero: the model is unchanged).
    dropout : float
        Dropout on the adapter path's input.
    bias : {"none", "all", "vera_only"}
        Which biases train: none, the adapted layers' (each adapter keeps its own) and,
        with ``"all"``, every other bias of the model too (shared by all adapters).
    layers_to_transform, layers_pattern
        Keep only layers whose index (after ``layers_pattern``) is listed, as in PEFT.
    dvora : bool
        DVoRA (DoRA's magnitude/direction split with VeRA's update) instead of VeRA.
    adapter_name : str
        Name of the new adapter. The first adapter becomes active; later ones are added
        inactive (see :func:`set_adapter`). Adding one costs the same however many the
        model already holds. An adapter added to a model FSDP2 already shards serves but
        never trains (its vectors are outside FSDP's groups): add adapters before
        ``fully_shard`` to train them.
    detach_norm : bool
        DVoRA only: treat the weight norm as a constant in backward (DoRA section 4.3).

    Returns
    -------
    nn.Module
        ``model`` itself.

    Raises
    ------
    ValueError
        A bad argument, a taken name, or ``target_modules`` matching nothing (the message
        lists candidate layer names); raised before the model is changed.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> model = add_vera(model, target_modules=["0", "2"], r=4)
    >>> trainable_parameters(model).trainable  # (r + out) per layer: (4 + 16) + (4 + 4)
    28
    >>> model(torch.randn(3, 8)).shape
    torch.Size([3, 4])
    """
    _check_common(r, seed, d_initial, dropout, bias)
    check_new_name(model, adapter_name)
    if not isinstance(dvora, bool) or not isinstance(detach_norm, bool):
        raise ValueError(f"dvora and detach_norm must be bools, got {dvora!r} and {detach_norm!r}")
    targets = _resolve_targets(model, target_modules, layers_to_transform, layers_pattern)
    dims = {path: typing.cast(tuple[int, int, bool], layer_dims(module)) for path, module in targets.items()}
    if dvora:
        check_dvora_targets(targets, "")
    max_in = max(d[0] for d in dims.values())
    max_out = max(d[1] for d in dims.values())
    state = getattr(model, STATE_NAME, None)
    existing = state.projections.find(vc.PRNG_ID, seed, r, max_in, max_out) if isinstance(state, VeraState) else None
    key = existing or ProjectionKey(vc.PRNG_ID, seed, r, max_in, max_out)
    interned = state.intern if isinstance(state, VeraState) else (lambda value: value)
    settings = AdapterSettings(
        name=adapter_name,
        method="dvora" if dvora else "vera",
        r=r,
        key=key,
        layers=interned(tuple(targets)),
        d_initial=float(d_initial),
        dropout=float(dropout),
        bias=bias,
        target_modules=interned(target_modules if isinstance(target_modules, str) else tuple(target_modules or ())),
        detach_norm=detach_norm,
    )
    attach(model, prepare(model, targets, settings))
    return model


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters."""
    return list(get_state(model).shared.active)


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapter(s); only their banks' rows train.

    Several active adapters sum their outputs (PEFT's rule; a layer then takes at most one
    DVoRA adapter and one adapter that trains its bias) and, in a mixed-adapter batch, are
    the adapters whose rows train (any number, DVoRA included).

    Examples
    --------
    >>> from torch import nn
    >>> model = add_vera(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2)
    >>> model = add_vera(model, ["0"], r=2, adapter_name="other")
    >>> set_adapter(model, "other"); active_adapters(model)
    ['other']
    """
    state = get_state(model)
    wanted = [names] if isinstance(names, str) else list(names)
    if not wanted:
        raise ValueError("set_adapter needs at least one adapter name")
    for name in wanted:
        _check_adapter(state, name)
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"set_adapter got a name twice: {wanted}")
    layers = vera_layers(model)
    state.shared.active[:] = wanted
    _set_trainable(model, state, layers.values())
    state.shared.changed()


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the bare base model inside the ``with`` block (no vector requires grad there).

    Raises RuntimeError (changing nothing) when an adapter is merged: unmerge first. The
    vectors' ``requires_grad`` comes back on exit, as in PEFT.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = add_vera(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2)
    >>> with disable_adapters(model):
    ...     y = model(torch.ones(1, 4))
    ...     print(trainable_parameters(model).trainable)
    0
    """
    state = get_state(model)
    merged = {n: layer.merged_adapters for n, layer in vera_layers(model).items() if layer.merged_adapters}
    if merged:
        raise RuntimeError(f"adapters are merged into {sorted(merged)}; unmerge_adapter(model) before disabling")
    previous = state.shared.disabled
    saved = {param: param.requires_grad for param in model.parameters()}
    state.shared.disabled = True
    for param in saved:
        param.requires_grad_(False)
    try:
        yield
    finally:
        state.shared.disabled = previous
        for param, flag in saved.items():
            param.requires_grad_(flag)


@contextlib.contextmanager
def adapter_names(model: nn.Module, names: Sequence[str] | torch.Tensor) -> Iterator[None]:
    """Per-row adapters for every forward inside the block, e.g. around Hugging Face ``generate()``.

    ``names`` holds one adapter name (or ``"__base__"``) per row, or is an
    :func:`adapter_index` tensor. A forward whose batch is ``k`` times larger (beam search,
    several returned sequences) repeats each row's adapter ``k`` times in place, as
    generation expands its inputs. ``model(x, adapter_names=...)`` does the same for one call.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = add_vera(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2)
    >>> with adapter_names(model, ["default", "__base__"]):
    ...     y = model(torch.ones(4, 4))  # rows 0-1: default, rows 2-3: none
    """
    state = get_state(model)
    rows = _batch_rows(model, state, names if isinstance(names, torch.Tensor) else list(names))
    rows.expandable = True
    previous = state.shared.rows
    state.shared.rows = rows
    try:
        yield
    finally:
        state.shared.rows = previous


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter (unmerged); O(its own size). Its projections go when no adapter uses them."""
    state = get_state(model)
    settings = _check_adapter(state, name)
    layers = vera_layers(model)
    merged = [p for p, layer in layers.items() if name in layer.merged_adapters]
    if merged:
        raise RuntimeError(f"adapter {name!r} is merged into {merged}; unmerge it before deleting it")
    for path in settings.layers:
        layer = layers.get(path)
        if layer is not None and layer.has_adapter(name):
            layer.delete_adapter(name)
    state.slots.remove(name)
    del state.settings[name]
    del state.shared.specs[name]
    key = settings.key
    state.key_users[key.name] -= 1
    if not state.key_users[key.name]:
        del state.key_users[key.name]
        state.projections.remove(key)
    if name in state.shared.active:
        state.shared.active.remove(name)
        _set_trainable(model, state, layers.values())
    state.shared.changed()


def merge_adapter(model: nn.Module, names: Sequence[str] | None = None, *, safe: bool = False) -> dict[str, float]:
    """Fold adapters (default: the active ones) into the base weights; returns the errors that added.

    Every layer is checked before any weight changes (which adapters may merge together,
    their vectors). With ``safe=True`` every merged weight is also computed and checked
    first: it must be finite and, for DVoRA, undoable by :func:`unmerge_adapter`; on
    failure a ValueError names the layer and no weight is changed.

    A quantized base (bitsandbytes 4-bit / 8-bit) is dequantized, merged and quantized
    again with its own settings: the returned dict gives, per such layer, the largest
    absolute weight error the re-quantization added (dense layers: 0.0).
    """
    state = get_state(model)
    wanted = list(state.shared.active if names is None else names)
    for name in wanted:
        _check_adapter(state, name)
    work = _merge_plan(model, wanted, safe=safe)
    errors = {}
    for path, (layer, todo) in work.items():
        errors[path] = layer.commit_merge(todo, *layer.merged_weight(todo, safe=safe))
    return errors


def _merge_plan(model: nn.Module, wanted: list[str], *, safe: bool) -> dict[str, tuple[VeraLinear, list[str]]]:
    """Per layer, the adapters to merge, every layer checked (and with ``safe`` dry-run) first."""
    work = {}
    for path, layer in vera_layers(model).items():
        todo = [n for n in wanted if layer.has_adapter(n) and n not in layer.merged_adapters]
        if not todo:
            continue
        dvora = [n for n in todo if layer.method_of(n) == "dvora"]
        if dvora and (len(todo) > 1 or layer.merged_adapters):
            raise RuntimeError(
                f"layer {path!r}: a DVoRA adapter must be merged alone, onto an unmerged weight "
                f"(merging {todo}, already merged {layer.merged_adapters}); no weight was changed"
            )
        layer.check_weight("merging")
        if safe:
            try:
                layer.merged_weight(todo)
            except ValueError as error:
                raise ValueError(f"layer {path!r}: {error}; no weight was changed") from error
        work[path] = (layer, todo)
    return work


def unmerge_adapter(model: nn.Module) -> dict[str, float]:
    """Undo every merge (up to rounding); checked on every layer first, never writing NaN or infinity.

    Returns, per layer, the largest absolute weight error the write added (re-quantization
    on a quantized base, else 0.0).
    """
    get_state(model)
    layers = {path: layer for path, layer in vera_layers(model).items() if layer.merged_adapters}
    for path, layer in layers.items():
        try:
            layer.unmerged_weight()
        except ValueError as error:
            raise ValueError(f"layer {path!r}: {error}") from error
    return {path: layer.commit_unmerge(layer.unmerged_weight()) for path, layer in layers.items()}


def merge_and_unload(
    model: nn.Module,
    *,
    safe: bool = False,
    quantized_base: str = "requantize",
    errors: dict[str, float] | None = None,
) -> nn.Module:
    """Merge the active adapters and put the plain base layers back; returns the bare model.

    Adapters that train their layer's bias write it into the base layer.

    Parameters
    ----------
    model : nn.Module
        An adapted model.
    safe : bool
        Check every merged weight first (finite, DVoRA undoable); nothing changes on failure.
    quantized_base : {"requantize", "dense"}
        For bitsandbytes 4-/8-bit bases: merge into the quantized layer (dequantize, add,
        quantize again with its settings), or replace it with a float32 ``nn.Linear``
        holding the dequantized weight plus the update (for deployment without the
        quantization error of the merge).
    errors : dict, optional
        Filled with each merged layer's largest absolute weight error added (the
        re-quantization error; 0.0 for dense weights and for ``"dense"``).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = add_vera(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2)
    >>> type(merge_and_unload(model)[0]).__name__
    'Linear'
    """
    if quantized_base not in ("requantize", "dense"):
        raise ValueError(f"quantized_base must be 'requantize' or 'dense', got {quantized_base!r}")
    state = get_state(model)
    work = _merge_plan(model, list(state.shared.active), safe=safe)
    added: dict[str, float] = {}
    for path, layer in vera_layers(model).items():
        base = layer.base_layer
        if path in work and quantized_base == "dense" and quantized.quantization(base) is not None:
            todo = work[path][1]
            weight, _ = layer.merged_weight(todo, safe=safe)
            dense = quantized.to_dense(base)
            with torch.no_grad():
                dense.weight.copy_(weight)
            base, added[path] = dense, 0.0
        elif path in work:
            added[path] = layer.commit_merge(work[path][1], *layer.merged_weight(work[path][1], safe=safe))
        own = [n for n in state.shared.active if layer.has_adapter(n) and "bias" in layer.vectors(n)]
        base_bias = getattr(base, "bias", None)
        if own and isinstance(base_bias, torch.Tensor):
            with torch.no_grad():
                base_bias.copy_(layer.vectors(own[0])["bias"])
        _replace(model, path, base)
    for hook in state._hooks:
        hook.remove()
    delattr(model, STATE_NAME)
    if errors is not None:
        errors.update(added)
    return model


@dataclasses.dataclass(frozen=True)
class TrainableReport:
    """Counts of trainable parameters (a bank's free rows are not counted)."""

    trainable: int
    total: int
    by_adapter: dict[str, int]

    @property
    def percent(self) -> float:
        """Trainable share of all parameters, in percent."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def _adapter_sizes(model: nn.Module) -> dict[str, int]:
    sizes: dict[str, int] = {}
    state = getattr(model, STATE_NAME, None)
    if not isinstance(state, VeraState):
        return sizes
    for layer in vera_layers(model).values():
        for bank in layer.banks():
            for slot in bank.slots():
                name = typing.cast(str, state.slots.name_at(slot))
                kinds = 1 + (bank.methods[slot] == DVORA) + bank.own_bias[slot]
                sizes[name] = sizes.get(name, 0) + bank.ranks[slot] + bank.out_features * kinds
    return sizes


def trainable_parameters(model: nn.Module) -> TrainableReport:
    """How many parameters train, overall and per adapter (shared projections are buffers, not counted)."""
    plain = [p for n, p in model.named_parameters() if ".vera_banks." not in f".{n}"]
    sizes = _adapter_sizes(model)
    state = getattr(model, STATE_NAME, None)
    active = set(state.shared.active) if isinstance(state, VeraState) and not state.shared.disabled else set()
    banks_train = any(p.requires_grad for n, p in model.named_parameters() if ".vera_banks." in f".{n}")
    trainable = sum(p.numel() for p in plain if p.requires_grad)
    if banks_train:
        trainable += sum(size for name, size in sizes.items() if name in active)
    total = sum(p.numel() for p in plain) + sum(sizes.values())
    return TrainableReport(trainable, total, sizes)


def _banks(model: nn.Module) -> list[AdapterBank]:
    return [bank for layer in vera_layers(model).values() for bank in layer.banks()]
