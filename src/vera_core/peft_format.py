"""Hugging Face PEFT VeRA adapter folders, read into and written from :class:`AdapterConfig`.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.vera_lambda_b`` / ``.vera_lambda_d``, trained biases as
``base_model.model.<layer>.base_layer.bias`` (adapted layers) or ``<module>.bias`` (the
others, with ``bias="all"``), and, when
``save_projection`` is true, ``base_model.vera_A`` (r, max_in) and ``base_model.vera_B``
(max_out, r). PEFT draws its projections with ``torch.Generator`` (Mersenne Twister),
not with vera-core's Threefry stream: an imported adapter records ``prng_id``
:data:`PEFT_PRNG_ID`, and one without stored projections can only be regenerated where
PyTorch is installed. Exported folders always store the projections (PEFT cannot
regenerate ours), and PEFT reads them back since 0.21.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vera_core.adapter_file import (
    PROJECTION_KEYS,
    AdapterConfig,
    AdapterFileError,
    LayerSpec,
    check_tensors,
    projection_checksum,
    safetensors_module,
    write_atomically,
)

PEFT_PRNG_ID = "torch-mt19937-peft"
"""The ``prng_id`` of adapters whose projections come from PEFT's ``torch.Generator``."""

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PEFT_A, _PEFT_B = "base_model.vera_A", "base_model.vera_B"
_LAYER_KEY = re.compile(
    r"^base_model\.model\.(?P<layer>.+?)(?P<wrapped>\.base_layer)?\.(?P<kind>vera_lambda_d|vera_lambda_b|bias)$"
)
_ADAPTED_BIAS = ".base_layer.bias"
"""PEFT's key suffix for the bias of an adapted layer (the wrapped base layer's parameter)."""
_PEFT_VERSION_WRITTEN = "0.21.2"


def is_peft_folder(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder with a PEFT ``adapter_config.json``."""
    return (Path(path) / CONFIG_NAME).is_file()


def _to_host(array: Any) -> Any:
    """A NumPy copy of a host tensor of either framework (for checksums)."""
    return array.detach().float().numpy() if hasattr(array, "detach") else array


def read_peft_folder(path: str | os.PathLike[str], *, framework: str = "numpy") -> tuple[AdapterConfig, dict[str, Any]]:
    """Read a PEFT VeRA adapter folder as a vera-core config and tensors.

    Parameters
    ----------
    path : path
        The folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
    framework : {"numpy", "torch"}
        How to read the tensors (use "torch" for bfloat16 files).

    Returns
    -------
    config : AdapterConfig
        ``prng_id`` is :data:`PEFT_PRNG_ID`; ``layers[...].in_features`` is None (PEFT
        does not record it) and ``max_in`` is known only when projections are stored.
    tensors : dict
        vera-core tensor names (``<layer>.lambda_d`` ...), plus ``projections.A`` and
        ``projections.B`` when the folder stores them.

    Raises
    ------
    AdapterFileError
        Not a VeRA adapter, a key this reader does not understand, or inconsistent shapes.
    """
    folder = Path(path)
    try:
        peft = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as error:
        raise AdapterFileError(f"{folder / CONFIG_NAME}: cannot read a JSON adapter config: {error}") from error
    if peft.get("peft_type") != "VERA":
        raise AdapterFileError(f"{folder} holds a {peft.get('peft_type')!r} adapter, not a PEFT VeRA adapter")
    module = safetensors_module(framework)
    try:
        raw = dict(module.load_file(str(folder / WEIGHTS_NAME)))
    except Exception as error:
        hint = " (bfloat16 tensors need framework='torch')" if "bf16" in str(error).lower() else ""
        raise AdapterFileError(f"{folder / WEIGHTS_NAME}: could not read its tensors: {error}{hint}") from error

    tensors: dict[str, Any] = {}
    unknown = []
    for key, value in raw.items():
        match = _LAYER_KEY.match(key)
        if key == _PEFT_A:
            tensors[PROJECTION_KEYS[0]] = value
        elif key == _PEFT_B:
            tensors[PROJECTION_KEYS[1]] = value
        elif match:
            kind = {"vera_lambda_d": "lambda_d", "vera_lambda_b": "lambda_b", "bias": "bias"}[match["kind"]]
            tensors[f"{match['layer']}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise AdapterFileError(f"{folder}: keys this reader does not understand: {', '.join(sorted(unknown))}")
    layer_names = sorted({name.rsplit(".", 1)[0] for name in tensors if name.endswith(".lambda_b")})
    if not layer_names:
        raise AdapterFileError(f"{folder}: no vera_lambda_b tensors, so no adapted layer")
    r = int(peft["r"])
    fan_in_fan_out = bool(peft.get("fan_in_fan_out", False))
    layers = {
        name: LayerSpec(
            out_features=int(tensors[f"{name}.lambda_b"].shape[0]),
            rank=int(tensors[f"{name}.lambda_d"].shape[0]) if f"{name}.lambda_d" in tensors else r,
            fan_in_fan_out=fan_in_fan_out,
        )
        for name in layer_names
    }
    bias_modules = {
        name[: -len(".bias")]: int(value.shape[0])
        for name, value in tensors.items()
        if name.endswith(".bias") and name[: -len(".bias")] not in layers
    }
    stored = PROJECTION_KEYS[0] in tensors
    max_in = int(tensors[PROJECTION_KEYS[0]].shape[1]) if stored else None
    max_out = int(tensors[PROJECTION_KEYS[1]].shape[0]) if stored else max(s.out_features for s in layers.values())
    config = AdapterConfig(
        r=r,
        seed=int(peft.get("projection_prng_key", 0)),
        max_in=max_in,
        max_out=max_out,
        layers=layers,
        d_initial=float(peft.get("d_initial", 0.1)),
        dropout=float(peft.get("vera_dropout", 0.0)),
        bias=str(peft.get("bias", "none")),
        prng_id=PEFT_PRNG_ID,
        prng_version=1,
        projections_sha256=(projection_checksum(*(_to_host(tensors[k]) for k in PROJECTION_KEYS)) if stored else None),
        target_modules=peft.get("target_modules"),
        bias_modules=bias_modules,
        extra={"peft_config": peft},
    )
    check_tensors(config, tensors)
    return config, tensors


def peft_config_dict(config: AdapterConfig) -> dict[str, Any]:
    """The ``adapter_config.json`` contents PEFT expects for ``config``."""
    source = dict(config.extra.get("peft_config", {}))
    layouts = {spec.fan_in_fan_out for spec in config.layers.values()}
    return {
        "auto_mapping": source.get("auto_mapping"),
        "base_model_name_or_path": source.get("base_model_name_or_path"),
        "bias": config.bias,
        "d_initial": config.d_initial,
        "fan_in_fan_out": layouts == {True},
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "peft_type": "VERA",
        "peft_version": _PEFT_VERSION_WRITTEN,
        "projection_prng_key": config.seed,
        "r": config.r,
        "revision": source.get("revision"),
        "save_projection": True,
        "target_modules": sorted(config.layers),
        "task_type": source.get("task_type"),
        "vera_dropout": config.dropout,
    }


def write_peft_folder(
    path: str | os.PathLike[str],
    config: AdapterConfig,
    tensors: Mapping[str, Any],
    A: Any,
    B: Any,
    *,
    framework: str = "numpy",
) -> None:
    """Write a PEFT VeRA folder that ``peft.PeftModel.from_pretrained`` loads.

    The projections ``A`` (r, max_in) and ``B`` (max_out, r) are always stored. A layer
    of rank smaller than ``r`` has its ``lambda_d`` padded with zeros to length ``r``:
    the padded rank components are multiplied by zero, so outputs are unchanged. Each
    file is written atomically, the weights before the config.

    Raises
    ------
    AdapterFileError
        For DVoRA adapters (PEFT has no DVoRA) or shapes that do not fit ``config``.
    """
    if config.method != "vera":
        raise AdapterFileError(f"PEFT has no {config.method.upper()}; only VeRA adapters can be exported to PEFT")
    if (
        config.max_in is None
        or tuple(A.shape) != (config.r, config.max_in)
        or tuple(B.shape) != (config.max_out, config.r)
    ):
        raise AdapterFileError(
            f"projections of shape {tuple(A.shape)} and {tuple(B.shape)} do not fit r={config.r}, "
            f"max_in={config.max_in}, max_out={config.max_out}"
        )
    check_tensors(config, {k: v for k, v in tensors.items() if k not in PROJECTION_KEYS})
    module = safetensors_module(framework)
    out: dict[str, Any] = {_PEFT_A: A, _PEFT_B: B}
    for name, spec in config.layers.items():
        lambda_d = tensors[f"{name}.lambda_d"]
        if spec.rank < config.r:
            lambda_d = _pad(lambda_d, config.r, framework)
        out[f"{_PREFIX}{name}.vera_lambda_d"] = lambda_d
        out[f"{_PREFIX}{name}.vera_lambda_b"] = tensors[f"{name}.lambda_b"]
        if config.bias != "none":
            out[f"{_PREFIX}{name}{_ADAPTED_BIAS}"] = tensors[f"{name}.bias"]
    for name in config.bias_modules:
        out[f"{_PREFIX}{name}.bias"] = tensors[f"{name}.bias"]
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    contiguous = {k: (v.detach().contiguous() if framework == "torch" else _np_contiguous(v)) for k, v in out.items()}
    write_atomically(folder / WEIGHTS_NAME, lambda tmp: module.save_file(contiguous, tmp, metadata={"format": "pt"}))
    text = json.dumps(peft_config_dict(config), indent=2, sort_keys=True)
    write_atomically(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def _np_contiguous(array: Any) -> Any:
    import numpy as np

    return np.ascontiguousarray(array)


def _pad(vector: Any, length: int, framework: str) -> Any:
    if framework == "torch":
        import torch

        return torch.cat([vector, vector.new_zeros(length - vector.shape[0])])
    import numpy as np

    return np.concatenate([vector, np.zeros(length - vector.shape[0], dtype=vector.dtype)])
