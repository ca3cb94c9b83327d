"""Adapter files and PEFT folders built byte by byte, independently of the code under test.

The safetensors container, the config JSON and the payload digest are written here from
their specifications (``docs/files.md``, :mod:`vera_core.adapter_file`), not with the
library's writers, so that tests can build any malformed variant and so that the
expected values do not come from the code being tested. Only
:func:`vera_core.generate_projections` (checked against the published stream elsewhere)
is used, for the projections' checksum.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

import vera_core as vc

SEED, R = 3, 4
LAYERS = {"fc1": (6, 5, 4), "fc2": (3, 6, 2)}
"""name -> (out_features, in_features, rank)."""
MAX_IN = max(i for _, i, _ in LAYERS.values())
MAX_OUT = max(o for o, _, _ in LAYERS.values())

Entry = tuple[str, tuple[int, ...], bytes]
"""A tensor as stored: (safetensors dtype code, shape, little-endian bytes)."""

_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "int32": "I32", "int64": "I64", "int8": "I8"}
_CODES |= {"uint8": "U8", "bool": "BOOL", "uint16": "U16"}


def entry(array: Any) -> Entry:
    """A NumPy array as a stored tensor."""
    array = np.asarray(array)
    return (
        _CODES[array.dtype.name],
        tuple(array.shape),
        np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes(),
    )


def bf16_entry(values: Any) -> Entry:
    """float32 values (exactly representable in bfloat16) stored as BF16: the top 16 bits."""
    bits = (np.asarray(values, dtype="<f4").view("<u4") >> 16).astype("<u2")
    return "BF16", tuple(bits.shape), bits.tobytes()


def container(entries: dict[str, Entry], metadata: dict[str, str] | None = None, *, pad: bool = True) -> bytes:
    """The bytes of a safetensors file: 8-byte header length, JSON header, data in name order."""
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    offset, blobs = 0, []
    for name in sorted(entries):
        code, shape, data = entries[name]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def projection_sha256(seed: int = SEED, r: int = R, max_in: int = MAX_IN, max_out: int = MAX_OUT) -> str:
    """SHA-256 of the float32 little-endian bytes of A then B."""
    A, B = vc.generate_projections(seed, r, max_in, max_out, xp=np)
    return hashlib.sha256(np.asarray(A, "<f4").tobytes() + np.asarray(B, "<f4").tobytes()).hexdigest()


def payload_sha256(config_text: str, entries: dict[str, Entry]) -> str:
    """The ``payload_sha256`` specification: the config text, then each tensor in name order."""
    digest = hashlib.sha256()
    digest.update(len(config_text.encode()).to_bytes(8, "little") + config_text.encode())
    for name in sorted(entries):
        code, shape, data = entries[name]
        digest.update(f"{name}\0{code}\0{','.join(map(str, shape))}\0".encode())
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def config(**changes: Any) -> dict[str, Any]:
    """The valid config as a JSON object (``changes`` replace top-level fields)."""
    found = {
        "r": R,
        "seed": SEED,
        "max_in": MAX_IN,
        "max_out": MAX_OUT,
        "layers": {
            name: {"out_features": out, "rank": rank, "in_features": inp, "fan_in_fan_out": False}
            for name, (out, inp, rank) in LAYERS.items()
        },
        "method": "vera",
        "d_initial": 0.1,
        "dropout": 0.0,
        "bias": "none",
        "prng_id": "threefry2x32-20",
        "prng_version": 1,
        "projections_sha256": projection_sha256(),
        "target_modules": sorted(LAYERS),
        "bias_modules": {},
        "extra": {},
    }
    found.update(copy.deepcopy(changes))
    return found


def vectors(dtype: str = "float32") -> dict[str, np.ndarray]:
    """The valid adapter's vectors: small exact values (representable in bfloat16)."""
    found = {}
    for index, (name, (out, _, rank)) in enumerate(LAYERS.items()):
        found[f"{name}.lambda_d"] = (np.arange(rank) + 1 + index).astype(dtype) / 4
        found[f"{name}.lambda_b"] = (np.arange(out) - 2 - index).astype(dtype) / 8
    return found


def ours(
    cfg: dict[str, Any] | str | None = None,
    tensors: dict[str, Entry] | None = None,
    *,
    metadata: dict[str, str] | None = None,
    digest: bool = True,
) -> bytes:
    """A vera-core adapter file; ``cfg`` a dict (dumped) or raw text; ``metadata`` replaces keys."""
    text = json.dumps(config() if cfg is None else cfg, sort_keys=True) if not isinstance(cfg, str) else cfg
    entries = {name: entry(value) for name, value in vectors().items()} if tensors is None else tensors
    meta = {"format": "vera-core", "format_version": "1", "config": text}
    if digest:
        meta["payload_sha256"] = payload_sha256(text, entries)
    meta.update(metadata or {})
    return container(entries, {k: v for k, v in meta.items() if v is not None})


def base_weights() -> dict[str, np.ndarray]:
    """Base weights the valid adapter fits: ``fc1`` (6, 5) and ``fc2`` (3, 6), with biases."""
    rng = np.random.default_rng(7)
    found = {}
    for name, (out, inp, _) in LAYERS.items():
        found[f"{name}.weight"] = rng.standard_normal((out, inp)).astype(np.float32)
        found[f"{name}.bias"] = rng.standard_normal(out).astype(np.float32)
    return found


def base_file() -> bytes:
    """:func:`base_weights` as a plain safetensors file."""
    return container({name: entry(value) for name, value in base_weights().items()})


def torch_model() -> Any:
    """A torch model whose layers ``fc1`` and ``fc2`` fit the valid adapter (same weights as :func:`base_weights`)."""
    import torch
    from torch import nn

    weights = base_weights()
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(5, 6), act=nn.ReLU(), fc2=nn.Linear(6, 3)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(weights[name]))
    return model


PEFT_PREFIX = "base_model.model."


def peft_config(**changes: Any) -> dict[str, Any]:
    """A valid PEFT VeRA ``adapter_config.json`` for :data:`LAYERS` (``changes`` replace fields)."""
    found = {
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "d_initial": 0.1,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "peft_type": "VERA",
        "peft_version": "0.21.2",
        "projection_prng_key": SEED,
        "r": R,
        "revision": None,
        "save_projection": True,
        "target_modules": sorted(LAYERS),
        "task_type": None,
        "vera_dropout": 0.0,
    }
    found.update(copy.deepcopy(changes))
    return found


def peft_tensors(*, stored: bool = True) -> dict[str, Entry]:
    """The PEFT weights of the valid adapter (lambda_d zero-padded to r; projections when ``stored``)."""
    found = {}
    for name, value in vectors().items():
        layer, kind = name.rsplit(".", 1)
        if kind == "lambda_d":
            value = np.concatenate([value, np.zeros(R - value.shape[0], np.float32)])
        found[f"{PEFT_PREFIX}{layer}.vera_{kind}"] = entry(value)
    if stored:
        A, B = vc.generate_projections(SEED, R, MAX_IN, MAX_OUT, xp=np)
        found["base_model.vera_A"], found["base_model.vera_B"] = entry(A), entry(B)
    return found


def peft_folder(
    folder: Path,
    cfg: dict[str, Any] | str | None = None,
    tensors: dict[str, Entry] | None = None,
    *,
    weights: bytes | None = None,
) -> Path:
    """Write a PEFT folder (``cfg`` a dict, raw text, or the valid config); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(peft_config() if cfg is None else cfg, indent=2) if not isinstance(cfg, str) else cfg
    (folder / "adapter_config.json").write_text(text)
    data = container(peft_tensors() if tensors is None else tensors, {"format": "pt"}) if weights is None else weights
    (folder / "adapter_model.safetensors").write_bytes(data)
    return folder


def peft_payload_sha256(entries: dict[str, Entry]) -> str:
    """``vera_payload_sha256`` of a PEFT weights file vera-core wrote: every tensor, no config."""
    digest = hashlib.sha256()
    for name in sorted(entries):
        code, shape, data = entries[name]
        digest.update(f"{name}\0{code}\0{','.join(map(str, shape))}\0".encode())
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def peft_weights_with_digest(entries: dict[str, Entry] | None = None) -> bytes:
    """A PEFT weights file as vera-core writes it: ``format: pt`` and ``vera_payload_sha256``."""
    entries = peft_tensors() if entries is None else entries
    return container(entries, {"format": "pt", "vera_payload_sha256": peft_payload_sha256(entries)})
