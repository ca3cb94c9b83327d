"""Adapter files for array backends: :mod:`vera_core.adapter_file` with host conversion.

Saving writes the core's file (NumPy host arrays); loading goes through the one core
loader, :func:`vera_core.loading.read_adapter`, which checks everything and verifies
the projections (stored, or regenerated and checked against ``projections_sha256``).
Arrays cross between device and host here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import vera_core as vc
from vera_core.adapter_file import (
    PROJECTION_KEYS,
    AdapterConfig,
    AdapterFileError,
    projection_checksum,
    save_adapter_file,
)
from vera_core.loading import VerifiedAdapter, read_adapter
from vera_numpy._backend import Backend


def projections(config: AdapterConfig, backend: Backend) -> tuple[Any, Any]:
    """The config's shared float32 projections, generated on the backend's device (new adapters)."""
    if config.max_in is None:
        raise AdapterFileError("the adapter gives no max_in, so its projections cannot be regenerated")
    return vc.generate_projections(
        config.seed,
        config.r,
        config.max_in,
        config.max_out,
        xp=backend.xp,
        dtype=backend.xp.float32,
        device=backend.device,
    )


def save(
    path: str | os.PathLike[str],
    config: AdapterConfig,
    vectors: Mapping[str, Any],
    A: Any,
    B: Any,
    backend: Backend,
    *,
    save_projections: bool = False,
) -> None:
    """Write ``vectors`` (named as in the file) and ``config`` with its projection checksum.

    ``A`` and ``B`` are copied to the host for the checksum (and stored when
    ``save_projections``).
    """
    host_A, host_B = backend.to_host(A), backend.to_host(B)
    tensors = {name: backend.to_host(value) for name, value in vectors.items()}
    if save_projections:
        tensors.update(zip(PROJECTION_KEYS, (host_A, host_B), strict=True))
    config = dataclasses.replace(config, projections_sha256=projection_checksum(host_A, host_B))
    save_adapter_file(path, config, tensors)


def load(
    path: str | os.PathLike[str],
    backend: Backend,
    in_features: Callable[[AdapterConfig], int],
    *,
    max_bytes: int | None = None,
) -> tuple[VerifiedAdapter, dict[str, Any], Any, Any]:
    """Read and verify an adapter (file or PEFT folder): it, its vectors and projections on the device.

    ``in_features(config)`` gives the widest input of the layers the adapter will be
    attached to; it sizes regenerated projections where the adapter does not record
    ``max_in`` (PEFT folders). Raises AdapterFileError (or a subclass) for anything
    wrong; nothing is allocated on the device before everything is checked.
    """
    adapter = read_adapter(path, max_bytes=max_bytes)
    width = None if adapter.config.max_in is not None else in_features(adapter.config)
    host_A, host_B = adapter.projections(max_in=width)
    vectors = {name: backend.from_host(value) for name, value in adapter.vectors.items()}
    return adapter, vectors, backend.from_host(host_A), backend.from_host(host_B)
