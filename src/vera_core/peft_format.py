"""Hugging Face PEFT VeRA adapter folders, read into and written from :class:`AdapterConfig`.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.vera_lambda_b`` / ``.vera_lambda_d``, trained biases as
``base_model.model.<layer>.base_layer.bias`` (adapted layers) or ``<module>.bias`` (the
others, with ``bias="all"``), and, when ``save_projection`` is true,
``base_model.vera_A`` (r, max_in) and ``base_model.vera_B`` (max_out, r). PEFT draws its
projections with ``torch.Generator`` (Mersenne Twister), not with vera-core's Threefry
stream: an imported adapter records ``prng_id`` :data:`PEFT_PRNG_ID`, and one without
stored projections can only be regenerated where PyTorch is installed. Exported folders
always store the projections (PEFT cannot regenerate ours), and PEFT reads them back
since 0.21.

Reading (:func:`read_peft_folder`, called by :func:`vera_core.loading.read_adapter`)
is strict: the config through :func:`~vera_core.peft_config.parse_peft_config`, every
key of the weights file understood, ``vera_lambda_d`` of length ``r``, both or neither
projection, as ``save_projection`` says. Writing replaces the whole folder as one unit
(:func:`vera_core.atomic.replace_folder`); other plain files already in it (PEFT's
``README.md``) are carried over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vera_core import _strict as s
from vera_core import safetensors_file
from vera_core.adapter_file import PROJECTION_KEYS, AdapterConfig, LayerSpec, check_tensors
from vera_core.atomic import replace_folder
from vera_core.errors import AdapterFileError, NotAnAdapterError
from vera_core.generators import PEFT_PRNG_ID, PEFT_PRNG_VERSION
from vera_core.peft_config import parse_peft_config

if TYPE_CHECKING:
    from vera_core.loading import _Parsed

__all__ = ["CONFIG_NAME", "PEFT_PRNG_ID", "WEIGHTS_NAME", "is_peft_folder", "peft_config_dict", "write_peft_folder"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20
"""The largest ``adapter_config.json`` read (PEFT's are about 1 KB)."""

_PREFIX = "base_model.model."
_PEFT_A, _PEFT_B = "base_model.vera_A", "base_model.vera_B"
_VECTOR = re.compile(r"^base_model\.model\.(?P<layer>.+)\.vera_lambda_(?P<kind>[db])$")
_ADAPTED_BIAS = re.compile(r"^base_model\.model\.(?P<layer>.+)\.base_layer\.bias$")
_OTHER_BIAS = re.compile(r"^base_model\.model\.(?P<module>.+)\.bias$")
_PEFT_VERSION_WRITTEN = "0.21.2"
_OWN = (CONFIG_NAME, WEIGHTS_NAME)


def is_peft_folder(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder with a PEFT ``adapter_config.json``."""
    return (Path(path) / CONFIG_NAME).is_file()


def _vector_length(key: str, entry: safetensors_file.Entry) -> int:
    if len(entry.shape) != 1 or entry.shape[0] < 1:
        raise AdapterFileError(f"tensor {s.shown(key, 80)} has shape {entry.shape}; it must be a non-empty vector")
    return entry.shape[0]


def _map_keys(contents: safetensors_file.Contents) -> dict[str, str]:
    """vera-core tensor name -> PEFT key, refusing unknown keys and two keys for one name."""
    names: dict[str, str] = {}
    unknown = []
    for key in contents.entries:
        vector, adapted, other = _VECTOR.match(key), _ADAPTED_BIAS.match(key), _OTHER_BIAS.match(key)
        if key == _PEFT_A:
            name = PROJECTION_KEYS[0]
        elif key == _PEFT_B:
            name = PROJECTION_KEYS[1]
        elif vector:
            name = f"{vector['layer']}.lambda_{vector['kind']}"
        elif adapted:
            name = f"{adapted['layer']}.bias"
        elif other:
            name = f"{other['module']}.bias"
        else:
            unknown.append(key)
            continue
        if name in names:
            raise AdapterFileError(f"keys {s.shown(names[name], 80)} and {s.shown(key, 80)} are the same tensor")
        names[name] = key
    if unknown:
        listed = ", ".join(s.shown(key, 80) for key in sorted(unknown)[:5])
        raise AdapterFileError(f"{WEIGHTS_NAME} has keys this reader does not understand: {listed}")
    return names


def read_peft_folder(folder: Path, budget: int) -> _Parsed:
    """Parse a PEFT VeRA folder into a config and the keys of its tensors (nothing materialised).

    Internal to :func:`vera_core.loading.read_adapter`, which checks the budget and reads
    the tensors. ``in_features`` is None (PEFT does not record it) and ``max_in`` is known
    only when the projections are stored.
    """
    from vera_core.loading import FORMAT_PEFT, _Parsed

    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.exists() and not weights_path.exists():
        raise NotAnAdapterError(f"{folder} is a folder, but not a PEFT adapter folder (no {CONFIG_NAME})")
    if not weights_path.exists() and (folder / PICKLE_NAME).exists():
        raise NotAnAdapterError(
            f"{folder} holds {PICKLE_NAME}, a pickle, and no {WEIGHTS_NAME}; vera-core never unpickles files "
            "(save it with PEFT's safe_serialization=True)"
        )
    text = safetensors_file.read_regular_file(
        config_path,
        "a JSON adapter config",
        max_bytes=MAX_CONFIG_BYTES,
        limit="the {:,} bytes allowed for a PEFT config",
    )
    peft = parse_peft_config(s.parse_json(bytes(text), CONFIG_NAME))
    contents = safetensors_file.read(weights_path, "a PEFT weights file", max_bytes=max(budget - len(text), 0))
    names = _map_keys(contents)
    entries = {name: contents.entries[key] for name, key in names.items()}
    layer_names = sorted({name[: -len(".lambda_b")] for name in names if name.endswith(".lambda_b")})
    layer_names += sorted(
        {name[: -len(".lambda_d")] for name in names if name.endswith(".lambda_d")} - set(layer_names)
    )
    if not layer_names:
        raise AdapterFileError(f"{WEIGHTS_NAME} has no vera_lambda_b tensors, so no adapted layer")
    layers = {}
    for layer in layer_names:
        for kind in ("lambda_d", "lambda_b"):
            if f"{layer}.{kind}" not in names:
                raise AdapterFileError(f"layer {s.shown(layer, 80)} has no vera_{kind} tensor")
        rank = _vector_length(names[f"{layer}.lambda_d"], entries[f"{layer}.lambda_d"])
        if rank != peft.r:
            raise AdapterFileError(
                f"tensor {s.shown(names[f'{layer}.lambda_d'], 80)} has length {rank}, but r is {peft.r}"
            )
        out_features = _vector_length(names[f"{layer}.lambda_b"], entries[f"{layer}.lambda_b"])
        layers[layer] = LayerSpec(out_features=out_features, rank=peft.r, fan_in_fan_out=peft.fan_in_fan_out)
    bias_modules = {}
    for name, key in names.items():
        module = name[: -len(".bias")]
        if name.endswith(".bias") and module not in layers:
            if _ADAPTED_BIAS.match(key):
                raise AdapterFileError(f"tensor {s.shown(key, 80)} is the bias of a layer without VeRA vectors")
            bias_modules[module] = _vector_length(key, entries[name])
    stored = [key in names for key in PROJECTION_KEYS]
    if stored[0] != stored[1]:
        raise AdapterFileError(f"{WEIGHTS_NAME} stores only one of {_PEFT_A} and {_PEFT_B}")
    if stored[0] != peft.save_projection:
        raise AdapterFileError(
            f"{CONFIG_NAME} says save_projection={str(peft.save_projection).lower()} but {WEIGHTS_NAME} "
            f"{'stores' if stored[0] else 'does not store'} the projections"
        )
    max_in = None
    max_out = max(spec.out_features for spec in layers.values())
    if stored[0]:
        shape_A, shape_B = entries[PROJECTION_KEYS[0]].shape, entries[PROJECTION_KEYS[1]].shape
        if len(shape_A) != 2 or len(shape_B) != 2 or shape_A[0] != peft.r or shape_B[1] != peft.r:
            raise AdapterFileError(
                f"{_PEFT_A} has shape {shape_A} and {_PEFT_B} {shape_B}; they must be (r, max_in) and (max_out, r) "
                f"with r={peft.r}"
            )
        max_in, max_out = shape_A[1], shape_B[0]
    config = AdapterConfig(
        r=peft.r,
        seed=peft.seed,
        max_in=max_in,
        max_out=max_out,
        layers=layers,
        d_initial=peft.d_initial,
        dropout=peft.dropout,
        bias=peft.bias,
        prng_id=PEFT_PRNG_ID,
        prng_version=PEFT_PRNG_VERSION,
        target_modules=peft.target_modules,
        bias_modules=bias_modules if peft.bias == "all" else {},
        extra={"peft_config": peft.raw},
    )
    if bias_modules and peft.bias != "all":
        raise AdapterFileError(
            f"{WEIGHTS_NAME} holds biases of other modules ({', '.join(sorted(bias_modules)[:3])}) but bias is "
            f"{peft.bias!r}"
        )
    payload = contents.metadata.get("vera_payload_sha256")
    return _Parsed(FORMAT_PEFT, config, contents, names, payload, len(text) + contents.size)


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


def _check_destination(folder: Path) -> list[Path]:
    """The plain files of an existing PEFT folder to carry over; refuse any other destination."""
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise AdapterFileError(f"{folder} exists and is not a folder")
    entries = list(folder.iterdir())
    if entries and not (folder / CONFIG_NAME).is_file():
        raise AdapterFileError(f"{folder} is a folder with other files in it; choose an empty or new folder")
    odd = [entry.name for entry in entries if entry.is_symlink() or not entry.is_file()]
    if odd:
        raise AdapterFileError(
            f"{folder} holds {', '.join(sorted(odd)[:3])}, not plain files; write the adapter to another folder"
        )
    return [entry for entry in entries if entry.name not in _OWN]


def write_peft_folder(
    path: str | os.PathLike[str], config: AdapterConfig, tensors: Mapping[str, Any], A: Any, B: Any
) -> None:
    """Write a PEFT VeRA folder that ``peft.PeftModel.from_pretrained`` loads, as one unit.

    ``tensors`` and the projections ``A`` (r, max_in) and ``B`` (max_out, r) are NumPy
    arrays; the projections are always stored. A layer of rank smaller than ``r`` has
    its ``lambda_d`` padded with zeros to length ``r``: the padded rank components are
    multiplied by zero, so outputs are unchanged. The weights file records
    ``vera_payload_sha256`` (ignored by PEFT, checked by vera-core). The new folder is
    built beside ``path`` and swapped in (:func:`vera_core.atomic.replace_folder`);
    other plain files of an existing PEFT folder (PEFT's ``README.md``) are kept.

    Raises
    ------
    AdapterFileError
        For DVoRA adapters (PEFT has no DVoRA), shapes that do not fit ``config``, or a
        destination that is a file, a non-PEFT folder with files, or holds sub-folders.
    """
    import numpy as np

    if config.method != "vera":
        raise AdapterFileError(f"PEFT has no {config.method.upper()}; only VeRA adapters can be exported to PEFT")
    A, B = np.asarray(A), np.asarray(B)
    if config.max_in is None or A.shape != (config.r, config.max_in) or B.shape != (config.max_out, config.r):
        raise AdapterFileError(
            f"projections of shape {A.shape} and {B.shape} do not fit r={config.r}, "
            f"max_in={config.max_in}, max_out={config.max_out}"
        )
    check_tensors(config, {k: v for k, v in tensors.items() if k not in PROJECTION_KEYS})
    out: dict[str, Any] = {_PEFT_A: A, _PEFT_B: B}
    for name, spec in config.layers.items():
        lambda_d = np.asarray(tensors[f"{name}.lambda_d"])
        if spec.rank < config.r:
            lambda_d = np.concatenate([lambda_d, np.zeros(config.r - spec.rank, dtype=lambda_d.dtype)])
        out[f"{_PREFIX}{name}.vera_lambda_d"] = lambda_d
        out[f"{_PREFIX}{name}.vera_lambda_b"] = tensors[f"{name}.lambda_b"]
        if config.bias != "none":
            out[f"{_PREFIX}{name}.base_layer.bias"] = tensors[f"{name}.bias"]
    for name in config.bias_modules:
        out[f"{_PREFIX}{name}.bias"] = tensors[f"{name}.bias"]
    laid = safetensors_file.host_layout(out)
    for key, (code, array) in laid.items():
        if code not in safetensors_file.FLOAT_CODES or not np.all(np.isfinite(array)):
            raise AdapterFileError(f"tensor {key!r} must be real floating and finite, got {array.dtype}")
    digest = safetensors_file.layout_digest(laid)
    folder = Path(path)
    carried = _check_destination(folder)
    text = json.dumps(peft_config_dict(config), indent=2, sort_keys=True)

    def populate(staging: Path) -> None:
        for entry in carried:
            try:
                os.link(entry, staging / entry.name)
            except OSError:
                shutil.copy2(entry, staging / entry.name)
        arrays = {key: array for key, (_, array) in laid.items()}
        metadata = {"format": "pt", "vera_payload_sha256": digest}
        safetensors_file.write(staging / WEIGHTS_NAME, arrays, metadata)
        (staging / CONFIG_NAME).write_text(text + "\n")

    replace_folder(folder, populate)
