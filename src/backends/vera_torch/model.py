"""Model surgery and adapter management: :func:`add_vera` and friends.

The model is changed in place: each targeted layer is replaced by a
:class:`~vera_torch.layers.VeraLinear` wrapping it, and the model gains a submodule
``vera_state`` holding the shared projections. ``model(x, adapter_names=[...])`` then
picks an adapter per batch row (``"__base__"`` for none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

import vera_core as vc
from vera_core.targets import ALL_LINEAR, matches, select_targets
from vera_torch.layers import BASE_ADAPTER, LayerAdapter, SharedState, VeraLinear, layer_dims
from vera_torch.projections import ProjectionKey, ProjectionStore

__all__ = [
    "STATE_NAME",
    "AdapterSettings",
    "TrainableReport",
    "VeraState",
    "active_adapters",
    "add_vera",
    "adapter_names",
    "delete_adapter",
    "disable_adapters",
    "get_state",
    "merge_adapter",
    "merge_and_unload",
    "set_adapter",
    "trainable_parameters",
    "unmerge_adapter",
    "vera_layers",
]

STATE_NAME = "vera_state"
"""Name of the submodule :func:`add_vera` adds to the model."""

BIAS_MODES = ("none", "all", "vera_only")


@dataclasses.dataclass(frozen=True)
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
    """The model-wide part of the adapters: shared projections, settings, active adapters.

    A plain attribute ``model.vera_state``, not a submodule: containers such as
    ``nn.Sequential`` iterate their submodules, and the projections must stay out of
    ``state_dict()`` and DDP's broadcasts.
    """

    def __init__(self) -> None:
        self.projections = ProjectionStore()
        self.shared = SharedState(self.projections)
        self.settings: dict[str, AdapterSettings] = {}
        self._hooks: list[Any] = []

    def __repr__(self) -> str:
        return f"VeraState(adapters={list(self.settings)}, active={self.shared.active})"


def get_state(model: nn.Module) -> VeraState:
    """The model's :class:`VeraState`; raises ValueError when it has no adapters."""
    state = getattr(model, STATE_NAME, None)
    if not isinstance(state, VeraState):
        raise ValueError("this model has no VeRA adapters; call vera_torch.add_vera(model, ...) first")
    return state


def _check_adapter(state: VeraState, name: str) -> AdapterSettings:
    if name not in state.settings:
        raise KeyError(f"no adapter named {name!r}; the model has {sorted(state.settings)}")
    return state.settings[name]


def vera_layers(model: nn.Module) -> dict[str, VeraLinear]:
    """Every :class:`VeraLinear` of the model by module path."""
    return {name: module for name, module in model.named_modules() if isinstance(module, VeraLinear)}


def _output_head_names(model: nn.Module) -> set[str]:
    heads = set()
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name.split(".")[-1] == "lm_head":
            heads.add(name)
    return heads


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Adaptable modules by path: wrapped layers by their wrapper path, our own modules excluded."""
    out: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, VeraLinear):
            skip.append(name)  # its base_layer is not a separate candidate
        out[name] = module
    return out


def _check_common(r: int, seed: int, d_initial: float, dropout: float, bias: str) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if not isinstance(d_initial, (int, float)) or not math.isfinite(d_initial):
        raise ValueError(f"d_initial must be a finite number, got {d_initial!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")


def _model_device(modules: Sequence[nn.Module]) -> torch.device:
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
    candidates = _candidates(model)
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        heads = _output_head_names(model)
        names = [n for n, m in candidates.items() if layer_dims(m) is not None and n not in heads]
        if layers_to_transform is not None:
            names = [
                n
                for n in names
                if matches(n, [n], layers_to_transform=layers_to_transform, layers_pattern=layers_pattern)
            ]
        chosen = select_targets(names, ALL_LINEAR)
    else:
        chosen = select_targets(
            candidates, target_modules, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern
        )
    bad = [f"{n} ({type(candidates[n]).__name__})" for n in chosen if layer_dims(candidates[n]) is None]
    if bad:
        raise ValueError(
            f"target_modules={target_modules!r} matches layers that are not linear-like: {', '.join(bad)}; "
            "VeRA adapts nn.Linear, transformers Conv1D and modules with in_features/out_features"
        )
    return {n: candidates[n] for n in chosen}


def _ensure_state(model: nn.Module) -> VeraState:
    state = getattr(model, STATE_NAME, None)
    if isinstance(state, VeraState):
        return state
    if state is not None:
        raise ValueError(f"the model already has an attribute {STATE_NAME!r} that is not a VeraState")
    state = VeraState()
    setattr(model, STATE_NAME, state)
    state._hooks.append(model.register_forward_pre_hook(_pop_adapter_names, with_kwargs=True))
    state._hooks.append(model.register_forward_hook(_clear_adapter_names, always_call=True))
    return state


def _pop_adapter_names(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    names = kwargs.pop("adapter_names", None)
    state: VeraState = getattr(module, STATE_NAME)
    if names is not None:
        names = list(names)
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in state.settings})
        if unknown:
            raise ValueError(f"adapter_names has unknown adapters {unknown}; the model has {sorted(state.settings)}")
        if state.shared.disabled:
            raise RuntimeError("adapters are disabled; leave the disable_adapters() context for a mixed batch")
    state.shared.batch_adapter_names = names
    return args, kwargs


def _clear_adapter_names(module: nn.Module, args: tuple, output: Any) -> None:
    getattr(module, STATE_NAME).shared.batch_adapter_names = None


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _set_trainable(model: nn.Module, state: VeraState) -> None:
    """Freeze everything but the active adapters' vectors (and biases where the adapter asks)."""
    active = set(state.shared.active)
    bias_modes = {state.settings[n].bias for n in active}
    for name, param in model.named_parameters():
        param.requires_grad_(False)
        if "all" in bias_modes and name.split(".")[-1] == "bias":
            param.requires_grad_(True)
    for layer in vera_layers(model).values():
        for store in (layer.vera_lambda_d, layer.vera_lambda_b, layer.vera_magnitude):
            for adapter, param in store.items():
                param.requires_grad_(adapter in active)
        if bias_modes & {"all", "vera_only"} and any(a in active for a in layer.adapters) and layer.bias is not None:
            layer.bias.requires_grad_(True)


def inject(
    model: nn.Module,
    targets: dict[str, nn.Module],
    settings: AdapterSettings,
    *,
    ranks: dict[str, int] | None = None,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    projections: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Attach a checked adapter to ``targets`` (internal: :func:`add_vera` and the loaders)."""
    state = _ensure_state(model)
    device = _model_device(list(targets.values()))
    state.projections.add(settings.key, device=device, tensors=projections)
    for path, module in targets.items():
        layer = module if isinstance(module, VeraLinear) else VeraLinear(module, state.shared)
        spec = LayerAdapter(
            settings.method, (ranks or {}).get(path, settings.r), settings.key, settings.dropout, settings.detach_norm
        )
        layer.add_adapter(settings.name, spec, d_initial=settings.d_initial, tensors=(tensors or {}).get(path))
        if layer is not module:
            _replace(model, path, layer)
    state.settings[settings.name] = settings
    if not state.shared.active:
        state.shared.active.append(settings.name)
    _set_trainable(model, state)


def check_new_name(model: nn.Module, adapter_name: str) -> None:
    """Raise ValueError when ``adapter_name`` is taken or not an identifier."""
    state = getattr(model, STATE_NAME, None)
    if isinstance(state, VeraState) and adapter_name in state.settings:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; delete it or pick another name")
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier() or adapter_name == BASE_ADAPTER:
        raise ValueError(f"adapter_name must be a Python identifier other than {BASE_ADAPTER!r}, got {adapter_name!r}")
    if hasattr(nn.ParameterDict(), adapter_name):
        raise ValueError(
            f"adapter_name {adapter_name!r} clashes with an nn.ParameterDict attribute (the vectors are stored in "
            "ParameterDicts keyed by adapter name); pick another name"
        )


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
        Which biases train: none, every bias of the model, or the adapted layers'.
    layers_to_transform, layers_pattern
        Keep only layers whose index (after ``layers_pattern``) is listed, as in PEFT.
    dvora : bool
        DVoRA (DoRA's magnitude/direction split with VeRA's update) instead of VeRA.
    adapter_name : str
        Name of the new adapter. The first adapter becomes active; later ones are added
        inactive (see :func:`set_adapter`).
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
    targets = _resolve_targets(model, target_modules, layers_to_transform, layers_pattern)
    dims = {path: typing.cast(tuple[int, int, bool], layer_dims(module)) for path, module in targets.items()}
    if dvora:
        for path, module in targets.items():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
                raise TypeError(f"DVoRA needs a dense floating-point weight, but layer {path!r} has none")
    max_in = max(d[0] for d in dims.values())
    max_out = max(d[1] for d in dims.values())
    state = getattr(model, STATE_NAME, None)
    existing = state.projections.find(vc.PRNG_ID, seed, r, max_in, max_out) if isinstance(state, VeraState) else None
    key = existing or ProjectionKey(vc.PRNG_ID, seed, r, max_in, max_out)
    settings = AdapterSettings(
        name=adapter_name,
        method="dvora" if dvora else "vera",
        r=r,
        key=key,
        layers=tuple(targets),
        d_initial=float(d_initial),
        dropout=float(dropout),
        bias=bias,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules or ()),
        detach_norm=detach_norm,
    )
    inject(model, targets, settings)
    return model


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters."""
    return list(get_state(model).shared.active)


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapter(s); only their vectors require grad.

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
    for name in wanted:
        _check_adapter(state, name)
    if not wanted:
        raise ValueError("set_adapter needs at least one adapter name")
    state.shared.active[:] = wanted
    _set_trainable(model, state)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the bare base model inside the ``with`` block.

    Raises RuntimeError (changing nothing) when an adapter is merged: unmerge first.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = add_vera(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2)
    >>> with disable_adapters(model):
    ...     y = model(torch.ones(1, 4))
    """
    state = get_state(model)
    merged = {n: layer.merged_adapters for n, layer in vera_layers(model).items() if layer.merged_adapters}
    if merged:
        raise RuntimeError(f"adapters are merged into {sorted(merged)}; unmerge_adapter(model) before disabling")
    previous = state.shared.disabled
    state.shared.disabled = True
    try:
        yield
    finally:
        state.shared.disabled = previous


@contextlib.contextmanager
def adapter_names(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Per-row adapters for every forward inside the block (``model(x, adapter_names=...)`` does one call)."""
    state = get_state(model)
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in state.settings})
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; the model has {sorted(state.settings)}")
    state.shared.batch_adapter_names = list(names)
    try:
        yield
    finally:
        state.shared.batch_adapter_names = None


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter (unmerged) and, when no adapter uses it any more, its projections."""
    state = get_state(model)
    settings = _check_adapter(state, name)
    layers = vera_layers(model)
    merged = [p for p, layer in layers.items() if name in layer.merged_adapters]
    if merged:
        raise RuntimeError(f"adapter {name!r} is merged into {merged}; unmerge it before deleting it")
    for layer in layers.values():
        if name in layer.adapters:
            layer.delete_adapter(name)
    del state.settings[name]
    if name in state.shared.active:
        state.shared.active.remove(name)
    if not any(s.key == settings.key for s in state.settings.values()):
        state.projections.remove(settings.key)
    _set_trainable(model, state)


def merge_adapter(model: nn.Module, names: Sequence[str] | None = None, *, safe: bool = False) -> None:
    """Fold adapters (default: the active ones) into the base weights.

    With ``safe=True`` every merged weight is computed and checked for NaN/inf first;
    on failure a ValueError names the layer and no weight is changed.
    """
    state = get_state(model)
    wanted = list(state.shared.active if names is None else names)
    for name in wanted:
        _check_adapter(state, name)
    layers = vera_layers(model)
    if safe:
        for path, layer in layers.items():
            trial = [n for n in wanted if n in layer.adapters and n not in layer.merged_adapters]
            if trial:
                _dry_run_merge(path, layer, trial)
    for layer in layers.values():
        layer.merge(wanted, safe=False)


def _dry_run_merge(path: str, layer: VeraLinear, names: list[str]) -> None:
    weight = layer._dense_weight("merging").detach()
    new = weight
    for name in names:
        A, B = layer._projections(name)
        d, b = (v.detach() for v in layer._vectors(name))
        try:
            if layer.adapters[name].method == "dvora":
                new, _ = vc.dvora_merge(
                    new,
                    A,
                    B,
                    layer.vera_magnitude[name].detach(),
                    d,
                    b,
                    fan_in_fan_out=layer.fan_in_fan_out,
                    safe=True,
                )
            else:
                new = vc.merge(new, A, B, d, b, fan_in_fan_out=layer.fan_in_fan_out, safe=True)
        except ValueError as error:
            raise ValueError(f"layer {path!r}, adapter {name!r}: {error}; no weight was changed") from error


def unmerge_adapter(model: nn.Module) -> None:
    """Undo every merge (up to rounding)."""
    get_state(model)
    for layer in vera_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module, *, safe: bool = False) -> nn.Module:
    """Merge the active adapters and put the plain base layers back; returns the bare model.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = add_vera(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2)
    >>> type(merge_and_unload(model)[0]).__name__
    'Linear'
    """
    state = get_state(model)
    merge_adapter(model, safe=safe)
    for path, layer in vera_layers(model).items():
        _replace(model, path, layer.base_layer)
    for hook in state._hooks:
        hook.remove()
    delattr(model, STATE_NAME)
    return model


@dataclasses.dataclass(frozen=True)
class TrainableReport:
    """Counts of trainable parameters."""

    trainable: int
    total: int
    by_adapter: dict[str, int]

    @property
    def percent(self) -> float:
        """Trainable share of all parameters, in percent."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> TrainableReport:
    """How many parameters train, overall and per adapter (shared projections are buffers, not counted)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    by_adapter: dict[str, int] = {}
    for layer in vera_layers(model).values():
        for store in (layer.vera_lambda_d, layer.vera_lambda_b, layer.vera_magnitude):
            for name, param in store.items():
                by_adapter[name] = by_adapter.get(name, 0) + param.numel()
    return TrainableReport(trainable, total, by_adapter)
