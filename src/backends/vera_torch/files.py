"""Save and load adapters in the vera-core file format (safetensors + JSON metadata).

The file holds the vectors and, optionally, the projections; its metadata records seed,
rank, shared sizes, generator id/version, the target layers (with ``in_features``) and
the SHA-256 of the projections. Reading and verifying is the core's
(:func:`vera_core.loading.read_adapter`: strict types, byte budget, checksums); this
module matches the verified adapter to the model and attaches it, checking every layer
before the model is touched.
"""

from __future__ import annotations

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
from vera_torch.layers import layer_dims
from vera_torch.model import (
    AdapterSettings,
    _candidates,
    _check_adapter,
    check_new_name,
    get_state,
    inject,
    vera_layers,
)
from vera_torch.projections import ProjectionKey, checksum

__all__ = ["adapter_config", "adapter_tensors", "load_adapter", "save_adapter"]


def adapter_config(model: nn.Module, adapter_name: str = "default") -> AdapterConfig:
    """The :class:`vera_core.adapter_file.AdapterConfig` describing one adapter of ``model``."""
    state = get_state(model)
    settings = _check_adapter(state, adapter_name)
    layers = {}
    for path, layer in vera_layers(model).items():
        if adapter_name in layer.adapters:
            layers[path] = LayerSpec(
                out_features=layer.out_features,
                rank=layer.adapters[adapter_name].rank,
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


def adapter_tensors(model: nn.Module, adapter_name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """The adapter's vectors (and biases when trained) as CPU tensors under file names."""
    tensors: dict[str, torch.Tensor] = {}
    layers = vera_layers(model)
    for path in config.layers:
        layer = layers[path]
        tensors[f"{path}.lambda_d"] = layer.vera_lambda_d[adapter_name].detach().cpu()
        tensors[f"{path}.lambda_b"] = layer.vera_lambda_b[adapter_name].detach().cpu()
        if config.method == "dvora":
            tensors[f"{path}.magnitude"] = layer.vera_magnitude[adapter_name].detach().cpu()
        if config.bias != "none":
            bias = layer.bias
            tensors[f"{path}.bias"] = bias.detach().cpu() if bias is not None else torch.zeros(layer.out_features)
    for path in config.bias_modules:
        bias = model.get_submodule(path).get_parameter("bias")
        tensors[f"{path}.bias"] = bias.detach().cpu()
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
    save_adapter_file(path, config, {name: to_host(value) for name, value in tensors.items()})
    return config


def to_host(tensor: torch.Tensor) -> Any:
    """A NumPy copy of ``tensor`` for a file: 16-bit floats widened exactly to float32."""
    value = tensor.detach().cpu()
    if value.dtype in (torch.float16, torch.bfloat16):
        value = value.float()
    return value.numpy()


def _match_layers(model: nn.Module, config: AdapterConfig, source: str) -> dict[str, nn.Module]:
    """The model's modules for every layer of ``config``, checked for shape and layout."""
    candidates = _candidates(model)
    targets: dict[str, nn.Module] = {}
    problems = []
    for path, spec in config.layers.items():
        module = candidates.get(path)
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


def _load_into(
    model: nn.Module, adapter: VerifiedAdapter, config: AdapterConfig, adapter_name: str, source: str
) -> None:
    targets = _match_layers(model, config, source)
    max_in = config.max_in or max(layer_dims(m)[0] for m in targets.values())  # type: ignore[index]
    for path, module in targets.items():
        if config.method == "dvora":
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
                raise AdapterFileError(f"{source}: DVoRA layer {path!r} needs a dense floating-point weight")
    other_biases = _other_bias_targets(model, config, source)
    key, pair = _projections_for(model, adapter, config, max_in)
    tensors = {name: torch.tensor(value) for name, value in adapter.vectors.items()}
    per_layer = {
        path: {
            kind: tensors[f"{path}.{kind}"]
            for kind in ("lambda_d", "lambda_b", "magnitude")
            if f"{path}.{kind}" in tensors
        }
        for path in config.layers
    }
    settings = AdapterSettings(
        name=adapter_name,
        method=config.method,
        r=config.r,
        key=key,
        layers=tuple(config.layers),
        d_initial=config.d_initial,
        dropout=config.dropout,
        bias=config.bias,
        target_modules=config.target_modules,
        detach_norm=config.detach_norm,
    )
    inject(
        model,
        targets,
        settings,
        ranks={p: s.rank for p, s in config.layers.items()},
        tensors=per_layer,
        projections=pair,
    )
    if config.bias != "none":
        with torch.no_grad():
            for path, layer in vera_layers(model).items():
                if path in config.layers and layer.bias is not None:
                    layer.bias.copy_(tensors[f"{path}.bias"])
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
