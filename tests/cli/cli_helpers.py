"""Builders of small synthetic adapter files and base weights for the command-line tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from vera_core import generate_projections, initial_magnitude
from vera_core.adapter_file import AdapterConfig, LayerSpec, projection_checksum

SEED = 3
R = 8
LAYERS = {"enc.fc1": (12, 16, 8), "enc.fc2": (10, 12, 4)}
"""name -> (out, in, rank)."""


def make_base(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Weights for LAYERS plus an unadapted head."""
    base = {}
    for name, (out, inp, _) in LAYERS.items():
        base[f"{name}.weight"] = rng.normal(size=(out, inp)).astype(np.float32)
        base[f"{name}.bias"] = rng.normal(size=out).astype(np.float32)
    base["head.weight"] = rng.normal(size=(3, 10)).astype(np.float32)
    return base


def make_adapter(
    rng: np.random.Generator, base: dict[str, np.ndarray], method: str = "vera", *, store: bool = False
) -> tuple[AdapterConfig, dict[str, np.ndarray]]:
    """A random adapter over LAYERS (checksum recorded; projections stored when ``store``)."""
    max_in = max(inp for _, inp, _ in LAYERS.values())
    max_out = max(out for out, _, _ in LAYERS.values())
    A, B = generate_projections(SEED, R, max_in, max_out, xp=np)
    tensors: dict[str, np.ndarray] = {}
    for name, (out, _, rank) in LAYERS.items():
        tensors[f"{name}.lambda_d"] = rng.normal(size=rank).astype(np.float32)
        tensors[f"{name}.lambda_b"] = rng.normal(size=out).astype(np.float32)
        if method == "dvora":
            magnitude = initial_magnitude(base[f"{name}.weight"]) * rng.uniform(0.5, 1.5, size=out)
            tensors[f"{name}.magnitude"] = magnitude.astype(np.float32)
    if store:
        tensors["projections.A"], tensors["projections.B"] = A, B
    config = AdapterConfig(
        r=R,
        seed=SEED,
        max_in=max_in,
        max_out=max_out,
        layers={name: LayerSpec(out, rank, inp) for name, (out, inp, rank) in LAYERS.items()},
        method=method,
        projections_sha256=projection_checksum(A, B),
    )
    return config, tensors


def read_tensors(path: Any) -> tuple[Any, dict[str, Any]]:
    """The config and every tensor (projections included when stored) of a verified adapter file."""
    from vera_core.loading import read_adapter

    adapter = read_adapter(path)
    return adapter.config, adapter.tensors()
