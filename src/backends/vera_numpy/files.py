"""Adapter files for array backends: :mod:`vera_core.adapter_file` with host conversion.

The file is the core's (``framework="numpy"``), the one every vera-core backend
writes; arrays cross between device and host here and nowhere else. Projections are
float32 (the canonical stream) and are regenerated from the seed on load unless the
file stores them; either way their SHA-256 must match ``projections_sha256``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import vera_core as vc
from vera_core.adapter_file import (
    PROJECTION_KEYS,
    AdapterConfig,
    AdapterFileError,
    load_adapter_file,
    projection_checksum,
    save_adapter_file,
)
from vera_numpy._backend import Backend


def projections(config: AdapterConfig, backend: Backend) -> tuple[Any, Any]:
    """The config's shared float32 projections, generated on the backend's device."""
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
    save_adapter_file(path, config, tensors, framework="numpy")


def load(path: str | os.PathLike[str], backend: Backend) -> tuple[AdapterConfig, dict[str, Any], Any, Any]:
    """Read an adapter file: its config, its vectors and projections on the backend's device.

    Raises AdapterFileError when the projections cannot be had (a foreign generator and
    none stored) or their checksum disagrees with the file's.
    """
    config, tensors = load_adapter_file(path, framework="numpy")
    stored = [tensors.pop(key) for key in PROJECTION_KEYS if key in tensors]
    if stored:
        host_A, host_B = stored
        A, B = backend.from_host(host_A), backend.from_host(host_B)
    elif (config.prng_id, config.prng_version) != (vc.PRNG_ID, vc.PRNG_VERSION):
        raise AdapterFileError(
            f"{path} was made with generator {config.prng_id!r} v{config.prng_version} and stores no projections; "
            f"this vera-core regenerates only {vc.PRNG_ID!r} v{vc.PRNG_VERSION}"
        )
    else:
        A, B = projections(config, backend)
        host_A, host_B = backend.to_host(A), backend.to_host(B)
    if config.projections_sha256 is not None and projection_checksum(host_A, host_B) != config.projections_sha256:
        raise AdapterFileError(
            f"{path}: the projections' SHA-256 does not match the file's projections_sha256; "
            "the generator disagrees with the one that made the adapter"
        )
    return config, {name: backend.from_host(value) for name, value in tensors.items()}, A, B
