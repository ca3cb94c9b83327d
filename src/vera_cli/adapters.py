"""Loading adapters of either format and obtaining their shared projections, with NumPy only.

Both vera-core adapter files and PEFT VeRA folders are read into a :class:`LoadedAdapter`
holding host (NumPy) arrays. The projections come from the file when stored, from
vera-core's Threefry generator (NumPy) for ``threefry2x32-20`` adapters, and from PEFT's
``torch.Generator`` recipe for ``torch-mt19937-peft`` adapters, which needs PyTorch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from vera_core.adapter_file import (
    PROJECTION_KEYS,
    AdapterConfig,
    AdapterFileError,
    load_adapter_file,
)
from vera_core.peft_format import PEFT_PRNG_ID, is_peft_folder, read_peft_folder
from vera_core.projections import PRNG_ID, PRNG_VERSION, generate_projections


class CliError(Exception):
    """A problem with the user's files or arguments, reported in one line with exit status 1."""


FORMAT_OURS = "vera-core"
FORMAT_PEFT = "peft"


@dataclasses.dataclass
class LoadedAdapter:
    """An adapter read from disk, with host arrays."""

    path: Path
    format: str
    """:data:`FORMAT_OURS` or :data:`FORMAT_PEFT`."""
    config: AdapterConfig
    vectors: dict[str, np.ndarray]
    """Every tensor but the projections (``<layer>.lambda_d``, ``.lambda_b``, ...)."""
    stored: tuple[np.ndarray, np.ndarray] | None
    """``(A, B)`` when the file stores the projections."""

    @property
    def trainable_parameters(self) -> int:
        """Number of stored adapter parameters (vectors, magnitudes, biases)."""
        return int(sum(v.size for v in self.vectors.values()))

    def size_bytes(self) -> int:
        """Bytes on disk (the file, or every file of a folder)."""
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        return self.path.stat().st_size


def torch_available() -> bool:
    """Whether PyTorch can be imported (without importing it)."""
    return importlib.util.find_spec("torch") is not None


def _host(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (bfloat16 files)
        return value.detach().float().numpy()
    return np.asarray(value)


def load_adapter(path: str | os.PathLike[str]) -> LoadedAdapter:
    """Read a vera-core adapter file or a PEFT VeRA folder.

    Raises
    ------
    CliError
        The path does not exist or is neither format.
    AdapterFileError
        The file or folder is malformed.
    """
    source = Path(path)
    if not source.exists():
        raise CliError(f"{source}: no such file or folder")
    if source.is_dir():
        if not is_peft_folder(source):
            raise CliError(f"{source}: a folder, but not a PEFT adapter folder (no adapter_config.json)")
        try:
            config, tensors = read_peft_folder(source)
        except AdapterFileError as error:
            if "bf16" not in str(error).lower() or not torch_available():
                raise
            config, tensors = read_peft_folder(source, framework="torch")
        kind = FORMAT_PEFT
    else:
        config, tensors = load_adapter_file(source)
        kind = FORMAT_OURS
    host = {name: _host(value) for name, value in tensors.items()}
    stored = (host.pop(PROJECTION_KEYS[0]), host.pop(PROJECTION_KEYS[1])) if PROJECTION_KEYS[0] in host else None
    return LoadedAdapter(source, kind, config, host, stored)


def peft_projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's projections: ``torch.Generator(device="cpu").manual_seed(seed)``, A then B.

    Each is drawn with ``uniform_(-bound, bound)`` in float32 with PEFT's
    ``bound = sqrt(3) * sqrt(2) / sqrt(fan_in)`` (A: fan_in = max_in; B: fan_in = r).

    Raises
    ------
    CliError
        PyTorch is not installed.
    """
    if not torch_available():
        raise CliError(
            "the adapter's projections come from PEFT's torch generator and are not stored: "
            "install torch to regenerate them"
        )
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)

    def draw(shape: tuple[int, int]) -> np.ndarray:
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
        return torch.empty(shape).uniform_(-bound, bound, generator=generator).numpy()

    A = draw((r, max_in))
    B = draw((max_out, r))
    return A, B


def regenerate(config: AdapterConfig, max_in: int, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The projections the adapter's generator gives for its seed, as NumPy arrays.

    Adapters use the float32 matrices (the canonical stream); ``dtype`` float64 draws
    the 53-bit stream instead, to compare with projections stored in float64.

    Raises
    ------
    CliError
        An unknown generator, or PEFT's generator without PyTorch installed.
    """
    if config.prng_id == PRNG_ID and config.prng_version == PRNG_VERSION:
        wide = np.float64 if np.dtype(dtype) == np.float64 else np.float32
        A, B = generate_projections(config.seed, config.r, max_in, config.max_out, xp=np, dtype=wide)
        return A, B
    if config.prng_id == PEFT_PRNG_ID:
        return peft_projections(config.seed, config.r, max_in, config.max_out)
    raise CliError(
        f"unknown projection generator {config.prng_id!r} version {config.prng_version}; "
        f"this vera-core knows {PRNG_ID} v{PRNG_VERSION} and {PEFT_PRNG_ID}"
    )


def projections(adapter: LoadedAdapter, max_in: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The adapter's projections: stored ones when present, else regenerated from the seed.

    Parameters
    ----------
    adapter : LoadedAdapter
        The adapter.
    max_in : int, optional
        The largest input features of the adapted layers, for adapters whose metadata
        does not record it (PEFT folders without stored projections).

    Raises
    ------
    CliError
        ``max_in`` unknown, or the generator cannot be run here.
    """
    if adapter.stored is not None:
        return adapter.stored
    width = adapter.config.max_in if adapter.config.max_in is not None else max_in
    if width is None:
        raise CliError(f"{adapter.path}: the projections are not stored and the adapter does not record max_in")
    return regenerate(adapter.config, width)
