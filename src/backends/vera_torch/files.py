"""Save and load adapters in the vera-core file format (safetensors + JSON metadata).

The file holds the vectors and, optionally, the projections; its metadata records seed,
rank, shared sizes, generator id/version, the target layers (with ``in_features``) and
the SHA-256 of the projections. Reading and verifying is the core's
(:func:`vera_core.loading.read_adapter`: strict types, byte budget, checksums); this
module matches the verified adapter to the model and attaches it, checking every layer
before the model is touched.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vera_core.adapter_file import (
    PROJECTION_KEYS,
    AdapterConfig,
    AdapterFileError,
    LayerSpec,
    save_adapter_file,
)
from vera_core.loading import FORMAT_OURS, VerifiedAdapter, read_adapter
from vera_torch.distributed import copy_into, host_copy, is_sharded, write_once
from vera_torch.layers import layer_dims
from vera_torch.model import (
    AdapterSettings,
    _check_adapter,
    attach,
    candidates,
    check_dvora_targets,
    check_new_name,
    get_state,
    prepare,
    vera_layers,
)
from vera_torch.projections import ProjectionKey, checksum

__all__ = ["adapter_config", "adapter_parameters", "adapter_tensors", "load_adapter", "restore_adapter", "save_adapter"]


def adapter_config(model: nn.Module, adapter_name: str = "default") -> AdapterConfig:
    """The :class:`vera_core.adapter_file.AdapterConfig` describing one adapter of ``model``."""
    state = get_state(model)
    settings = _check_adapter(state, adapter_name)
    layers = {}
    all_layers = vera_layers(model)
    for path in settings.layers:
        layer = all_layers.get(path)
        if layer is not None and layer.has_adapter(adapter_name):
            layers[path] = LayerSpec(
                out_features=layer.out_features,
                rank=layer.rank_of(adapter_name),
                in_features=layer.in_features,
                fan_in_fan_out=layer.fan_in_fan_out,
            )
    key = settings.key
    A, B = state.projections.get(key)
    return AdapterConfig(
        r=key.r,
        seed=key.seed,
        max_in=key.max_in,
        max_out=key.max_out,
        layers=layers,
        method=settings.method,
        d_initial=settings.d_initial,
        dropout=settings.dropout,
        bias=settings.bias,
        prng_id=key.prng_id,
        projections_sha256=checksum(A, B),
        target_modules=settings.target_modules,
        bias_modules=_other_biases(model, layers) if settings.bias == "all" else {},
        extra={"detach_norm": settings.detach_norm, "requested_r": settings.r, "framework": "torch"},
    )


def _other_biases(model: nn.Module, layers: Mapping[str, LayerSpec]) -> dict[str, int]:
    """The biases ``bias="all"`` trains outside the adapted layers: module path -> size."""
    adapted = {f"{path}.base_layer.bias" for path in layers} | {f"{path}.bias" for path in layers}
    return {
        name[: -len(".bias")]: int(param.numel())
        for name, param in model.named_parameters()
        if name.endswith(".bias") and name not in adapted and param.dim() == 1
    }


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one file entry of an adapter lives in the model."""

    tensor: torch.Tensor
    """A bank parameter (one row per adapter) or a plain bias parameter; a ``DTensor`` under FSDP2."""
    row: int | None = None
    """The adapter's row of a bank parameter (None: the whole tensor)."""
    length: int | None = None
    """The entries of the row the adapter uses (its rank, for ``lambda_d``)."""


def adapter_parameters(model: nn.Module, adapter_name: str, config: AdapterConfig) -> dict[str, Entry]:
    """The model's live tensors behind each file entry of one adapter.

    Under FSDP2 the tensors are ``DTensor`` shards; :func:`adapter_tensors` gathers them.
    """
    entries: dict[str, Entry] = {}
    layers = vera_layers(model)
    for path in config.layers:
        layer = layers[path]
        bank, slot = layer.find(adapter_name) or (None, None)
        if bank is None or slot is None:
            raise KeyError(f"adapter {adapter_name!r} does not adapt layer {path!r}")
        for kind in layer.vectors(adapter_name):
            length = bank.ranks[slot] if kind == "lambda_d" else None
            entries[f"{path}.{kind}"] = Entry(bank.parameters_by_kind()[kind], slot, length)
    for path in config.bias_modules:
        entries[f"{path}.bias"] = Entry(model.get_submodule(path).get_parameter("bias"))
    return entries


def _gathered(entries: dict[str, Entry]) -> dict[int, torch.Tensor]:
    """Every distinct tensor of ``entries`` gathered once, in a fixed order (a collective under FSDP2)."""
    wholes: dict[int, torch.Tensor] = {}
    for entry in entries.values():
        if id(entry.tensor) not in wholes:
            wholes[id(entry.tensor)] = host_copy(entry.tensor)
    return wholes


def adapter_tensors(model: nn.Module, adapter_name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """The adapter's vectors (and biases when trained) as CPU tensors under file names.

    On a model with FSDP2 shards this is a collective (each bank parameter the adapter has a
    row in is gathered, nothing else).
    """
    entries = adapter_parameters(model, adapter_name, config)
    wholes = _gathered(entries)
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in entries.items():
        whole = wholes[id(entry.tensor)]
        tensors[name] = (whole if entry.row is None else whole[entry.row, : entry.length]).clone()
    return tensors


def save_adapter(
    model: nn.Module, path: str | os.PathLike[str], adapter_name: str = "default", *, save_projections: bool = False
) -> AdapterConfig:
    """Write one adapter to a ``.safetensors`` file atomically; returns its config.

    Parameters
    ----------
    model : nn.Module
        A model prepared by :func:`vera_torch.add_vera`.
    path : path
        Destination file.
    adapter_name : str
        Which adapter.
    save_projections : bool
        Also store A and B (needed for projections that cannot be regenerated, such as
        ones loaded from a file; forced then).

    Notes
    -----
    On a model sharded with FSDP2 (``fully_shard``) every rank calls this: only the
    adapter's vectors are gathered, and global rank 0 writes the file, which holds what
    the same model in one process would write.

    Examples
    --------
    >>> import os, tempfile
    >>> from torch import nn
    >>> from vera_torch import add_vera
    >>> model = add_vera(nn.Sequential(nn.Linear(8, 4)), ["0"], r=2)
    >>> f = os.path.join(tempfile.mkdtemp(), "adapter.safetensors")
    >>> save_adapter(model, f).r
    2
    """
    config = adapter_config(model, adapter_name)
    key = get_state(model).settings[adapter_name].key
    tensors: dict[str, Any] = adapter_tensors(model, adapter_name, config)
    if save_projections or key.checksum is not None:
        A, B = get_state(model).projections.get(key)
        tensors[PROJECTION_KEYS[0]], tensors[PROJECTION_KEYS[1]] = A, B
    host = {name: to_host(value) for name, value in tensors.items()}
    write_once(lambda: save_adapter_file(path, config, host), is_sharded(model.parameters()))
    return config


def to_host(tensor: torch.Tensor) -> Any:
    """A NumPy copy of ``tensor`` for a file: 16-bit floats widened exactly to float32."""
    value = tensor.detach().cpu()
    if value.dtype in (torch.float16, torch.bfloat16):
        value = value.float()
    return value.numpy()


def _match_layers(model: nn.Module, config: AdapterConfig, source: str) -> dict[str, nn.Module]:
    """The model's modules for every layer of ``config``, checked for shape and layout."""
    found = candidates(model)
    targets: dict[str, nn.Module] = {}
    problems = []
    for path, spec in config.layers.items():
        module = found.get(path)
        dims = None if module is None else layer_dims(module)
        if module is None or dims is None:
            problems.append(f"{path}: not a linear-like layer of the model")
            continue
        n_in, n_out, fifo = dims
        if n_out != spec.out_features or (spec.in_features is not None and n_in != spec.in_features):
            problems.append(
                f"{path}: the adapter expects (out={spec.out_features}, in={spec.in_features}), "
                f"the model's layer is (out={n_out}, in={n_in})"
            )
        elif config.max_in is not None and n_in > config.max_in:
            problems.append(f"{path}: {n_in} inputs exceed the projections' max_in={config.max_in}")
        elif fifo != spec.fan_in_fan_out and spec.in_features is not None:
            problems.append(f"{path}: weight layout fan_in_fan_out={fifo}, the adapter says {spec.fan_in_fan_out}")
        targets[path] = module
    if problems:
        raise AdapterFileError(f"{source} does not fit this model (nothing was changed): " + "; ".join(problems))
    return targets


def _projections_for(
    model: nn.Module, adapter: VerifiedAdapter, config: AdapterConfig, max_in: int
) -> tuple[ProjectionKey, tuple[torch.Tensor, torch.Tensor] | None]:
    """The key and, when the model lacks it, the verified pair (stored, or regenerated by the core)."""
    A, B = adapter.projections(max_in=None if adapter.config.max_in is not None else max_in)
    digest = adapter.config.projections_sha256 if adapter.stored is not None else None
    key = ProjectionKey(config.prng_id, config.seed, config.r, int(A.shape[1]), config.max_out, checksum=digest)
    state = getattr(model, "vera_state", None)
    if state is not None and key.name in state.projections.keys_by_name:
        return key, None
    return key, (torch.tensor(A), torch.tensor(B))


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    activate: bool = False,
    max_bytes: int | None = None,
) -> AdapterConfig:
    """Load a vera-core adapter file into ``model`` (which may have no adapters yet).

    The file is read and verified by :func:`vera_core.loading.read_adapter` (strict
    types, the byte budget ``max_bytes``, payload and projection checksums); then each
    layer's shape is checked against the model's, all before the model changes. Raises
    :class:`vera_core.adapter_file.AdapterFileError` (or a subclass) with the reasons
    otherwise; PEFT folders go to :func:`vera_torch.load_peft_adapter`.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> from vera_torch import add_vera
    >>> model = add_vera(nn.Sequential(nn.Linear(8, 4)), ["0"], r=2)
    >>> f = os.path.join(tempfile.mkdtemp(), "adapter.safetensors")
    >>> _ = save_adapter(model, f)
    >>> fresh = nn.Sequential(nn.Linear(8, 4))
    >>> load_adapter(fresh, f).layers["0"].in_features
    8
    """
    source = str(path)
    check_new_name(model, adapter_name)
    adapter = read_adapter(path, max_bytes=max_bytes)
    if adapter.format != FORMAT_OURS:
        raise AdapterFileError(f"{source} is a PEFT folder; load it with vera_torch.load_peft_adapter")
    _load_into(model, adapter, adapter.config, adapter_name, source)
    if activate:
        from vera_torch.model import set_adapter

        set_adapter(model, adapter_name)
    return adapter.config


def restore_adapter(model: nn.Module, path: str | os.PathLike[str], adapter_name: str = "default") -> AdapterConfig:
    """Copy a saved adapter's vectors into the model's existing adapter of the same layout (resume).

    Where :func:`load_adapter` adds a new adapter, this writes into the vectors that
    :func:`vera_torch.add_vera` made, so it also serves a model already sharded with FSDP2:
    every rank reads the file and keeps its own part of each vector (nothing is
    communicated), and the vectors stay in FSDP's parameter groups, so they keep training
    in sync. The file must describe the same adapter (method, rank, projections, bias mode,
    layers); everything is checked before a vector changes, else
    :class:`vera_core.adapter_file.AdapterFileError` lists the differences.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> from vera_torch import add_vera
    >>> model = add_vera(nn.Sequential(nn.Linear(8, 4)), ["0"], r=2)
    >>> f = os.path.join(tempfile.mkdtemp(), "adapter.safetensors")
    >>> with torch.no_grad():
    ...     _ = model[0].vectors("default")["lambda_b"].fill_(0.5)
    >>> _ = save_adapter(model, f)
    >>> with torch.no_grad():
    ...     _ = model[0].vectors("default")["lambda_b"].zero_()
    >>> _ = restore_adapter(model, f)
    >>> model[0].vectors("default")["lambda_b"].tolist()
    [0.5, 0.5, 0.5, 0.5]
    """
    current = adapter_config(model, adapter_name)
    adapter = read_adapter(path)
    if adapter.format != FORMAT_OURS:
        raise AdapterFileError(f"{path} is a PEFT folder: restore_adapter takes vera-core adapter files")
    config = adapter.config
    tensors = {name: torch.from_numpy(value.copy()) for name, value in adapter.vectors.items()}
    problems = _layout_differences(current, config)
    if problems:
        raise AdapterFileError(
            f"{path} does not describe the model's adapter {adapter_name!r} (nothing was changed):\n  "
            + "\n  ".join(problems)
        )
    entries = adapter_parameters(model, adapter_name, current)
    wholes = _gathered(entries)
    for name, entry in entries.items():
        whole = wholes[id(entry.tensor)]
        if entry.row is None:
            whole.copy_(tensors[name])
        else:
            whole[entry.row, : entry.length] = tensors[name]
    for entry in {id(e.tensor): e for e in entries.values()}.values():
        copy_into(entry.tensor, wholes[id(entry.tensor)])
    return config


def _layout_differences(current: AdapterConfig, stored: AdapterConfig) -> list[str]:
    """How a stored adapter's layout differs from the model's adapter (empty: the same)."""
    problems = [
        f"{field}: the file has {getattr(stored, field)!r}, the model {getattr(current, field)!r}"
        for field in ("method", "r", "seed", "prng_id", "max_out", "bias", "bias_modules")
        if getattr(stored, field) != getattr(current, field)
    ]
    if stored.max_in is not None and stored.max_in != current.max_in:
        problems.append(f"max_in: the file has {stored.max_in}, the model {current.max_in}")
    if stored.projections_sha256 not in (None, current.projections_sha256):
        problems.append("the projections' checksums differ")
    if set(stored.layers) != set(current.layers):
        problems.append(f"layers: the file has {sorted(stored.layers)}, the model {sorted(current.layers)}")
    for path in sorted(set(stored.layers) & set(current.layers)):
        mine, theirs = current.layers[path], stored.layers[path]
        if theirs.in_features is None:
            theirs = dataclasses.replace(theirs, in_features=mine.in_features)
        if theirs != mine:
            problems.append(f"{path}: the file has {theirs}, the model {mine}")
    return problems


def _load_into(
    model: nn.Module, adapter: VerifiedAdapter, config: AdapterConfig, adapter_name: str, source: str
) -> None:
    targets = _match_layers(model, config, source)
    max_in = config.max_in or max(layer_dims(m)[0] for m in targets.values())  # type: ignore[index]
    if config.method == "dvora":
        try:
            check_dvora_targets(targets, f"{source}: ")
        except TypeError as error:
            raise AdapterFileError(str(error)) from error
    other_biases = _other_bias_targets(model, config, source)
    key, pair = _projections_for(model, adapter, config, max_in)
    tensors = {name: torch.tensor(value) for name, value in adapter.vectors.items()}
    per_layer = {
        path: {
            kind: tensors[f"{path}.{kind}"]
            for kind in ("lambda_d", "lambda_b", "magnitude", "bias")
            if f"{path}.{kind}" in tensors
        }
        for path in config.layers
    }
    settings = AdapterSettings(
        name=adapter_name,
        method=config.method,
        r=int(config.extra.get("requested_r", config.r)),  # the rank asked for (the shared pair may be wider)
        key=key,
        layers=tuple(config.layers),
        d_initial=config.d_initial,
        dropout=config.dropout,
        bias=config.bias,
        target_modules=(
            tuple(config.target_modules) if isinstance(config.target_modules, list) else config.target_modules
        ),
        detach_norm=config.detach_norm,
    )
    prepared = prepare(
        model,
        targets,
        settings,
        ranks={p: s.rank for p, s in config.layers.items()},
        tensors=per_layer,
        projections=pair,
    )
    attach(model, prepared)
    if config.bias == "all":
        with torch.no_grad():
            for path, bias in other_biases.items():
                bias.copy_(tensors[f"{path}.bias"])


def _other_bias_targets(model: nn.Module, config: AdapterConfig, source: str) -> dict[str, torch.Tensor]:
    """The model's bias for each of ``config.bias_modules``, checked before anything changes."""
    found = {}
    for path, size in config.bias_modules.items():
        try:
            bias = model.get_submodule(path).bias
        except AttributeError:
            bias = None
        if not isinstance(bias, torch.Tensor) or bias.shape != (size,):
            got = "no bias" if not isinstance(bias, torch.Tensor) else f"a bias of shape {tuple(bias.shape)}"
            raise AdapterFileError(f"{source}: the file trains the bias of {path!r} ({size},) but the model has {got}")
        found[path] = bias
    return found
