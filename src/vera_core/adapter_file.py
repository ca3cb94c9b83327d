"""The vera-core adapter file: one safetensors file, vectors plus JSON metadata.

Tensors (host arrays; every backend converts to and from NumPy):

* ``<layer>.lambda_d`` (rank,), ``<layer>.lambda_b`` (out,) for every adapted layer;
* ``<layer>.magnitude`` (out,) for DVoRA;
* ``<layer>.bias`` (out,) when biases were trained (``bias`` "all" or "vera_only"),
  and ``<module>.bias`` for the other modules listed in ``bias_modules`` (``bias="all"``
  trains every bias of the model);
* ``projections.A`` (r, max_in) and ``projections.B`` (max_out, r) only when stored.

The safetensors header's ``__metadata__`` holds ``{"format": "vera-core",
"format_version": "1", "config": <AdapterConfig as JSON>}``. The projections are
normally *not* stored: they are regenerated from ``seed`` with the generator
``prng_id``/``prng_version``, and ``projections_sha256`` (of the float32 little-endian
bytes of A then B) detects a generator that disagrees. Files are written atomically
(a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vera_core.projections import PRNG_ID, PRNG_VERSION

FORMAT_NAME = "vera-core"
FORMAT_VERSION = 1
METHODS = ("vera", "dvora")
BIAS_MODES = ("none", "all", "vera_only")
PROJECTION_KEYS = ("projections.A", "projections.B")


class AdapterFileError(ValueError):
    """An adapter file or folder is malformed or does not fit what it is loaded into."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One adapted layer: its sizes, rank and weight layout."""

    out_features: int
    rank: int
    in_features: int | None = None
    """None when the file does not say (PEFT files); known once attached to a model."""
    fan_in_fan_out: bool = False


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Everything besides the vectors that an adapter needs, stored in the file's header.

    Examples
    --------
    >>> cfg = AdapterConfig(r=4, seed=0, max_in=8, max_out=6, layers={"fc": LayerSpec(6, 4, 8)})
    >>> AdapterConfig.from_json(cfg.to_json()) == cfg
    True
    """

    r: int
    seed: int
    max_in: int | None
    """None when the file does not say (a PEFT folder without stored projections)."""
    max_out: int
    layers: Mapping[str, LayerSpec]
    method: str = "vera"
    d_initial: float = 0.1
    dropout: float = 0.0
    bias: str = "none"
    prng_id: str = PRNG_ID
    prng_version: int = PRNG_VERSION
    projections_sha256: str | None = None
    target_modules: Any = None
    bias_modules: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Modules besides ``layers`` whose trained biases the file holds (``bias="all"``): name -> size."""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Free-form JSON-able details (e.g. the PEFT config an adapter came from)."""

    def __post_init__(self) -> None:
        for name in ("r", "max_in", "max_out"):
            value = getattr(self, name)
            if name == "max_in" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise AdapterFileError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise AdapterFileError(f"seed must be an int in [0, 2**64), got {self.seed!r}")
        if self.method not in METHODS:
            raise AdapterFileError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.bias not in BIAS_MODES:
            raise AdapterFileError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterFileError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layers:
            raise AdapterFileError("an adapter must adapt at least one layer")
        if self.bias_modules and self.bias != "all":
            raise AdapterFileError(f"bias_modules are stored only with bias='all', not bias={self.bias!r}")
        for name, size in self.bias_modules.items():
            if name in self.layers:
                raise AdapterFileError(f"{name!r} is an adapted layer: its bias is not listed in bias_modules")
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise AdapterFileError(f"bias_modules[{name!r}] must be a positive size, got {size!r}")
        for name, spec in self.layers.items():
            if not 1 <= spec.rank <= self.r:
                raise AdapterFileError(f"layer {name!r} has rank {spec.rank}, outside [1, r={self.r}]")
            if not 1 <= spec.out_features <= self.max_out:
                raise AdapterFileError(f"layer {name!r} has {spec.out_features} outputs, max_out is {self.max_out}")
            if spec.in_features is not None and self.max_in is not None and not 1 <= spec.in_features <= self.max_in:
                raise AdapterFileError(f"layer {name!r} has {spec.in_features} inputs, max_in is {self.max_in}")

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        """Parse :meth:`to_json`'s output, raising AdapterFileError on anything malformed."""
        try:
            fields = json.loads(text)
            fields["layers"] = {name: LayerSpec(**spec) for name, spec in fields["layers"].items()}
            return cls(**fields)
        except (TypeError, KeyError, ValueError) as error:
            if isinstance(error, AdapterFileError):
                raise
            raise AdapterFileError(f"malformed adapter metadata: {error}") from error

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name the file must hold, with its shape."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name, spec in self.layers.items():
            shapes[f"{name}.lambda_d"] = (spec.rank,)
            shapes[f"{name}.lambda_b"] = (spec.out_features,)
            if self.method == "dvora":
                shapes[f"{name}.magnitude"] = (spec.out_features,)
            if self.bias != "none":
                shapes[f"{name}.bias"] = (spec.out_features,)
        for name, size in self.bias_modules.items():
            shapes[f"{name}.bias"] = (size,)
        return shapes


def projection_checksum(A: Any, B: Any) -> str:
    """SHA-256 of the float32 little-endian bytes of ``A`` then ``B`` (host arrays).

    Examples
    --------
    >>> import numpy as np
    >>> len(projection_checksum(np.zeros((2, 3)), np.zeros((4, 2))))
    64
    """
    import numpy as np

    digest = hashlib.sha256()
    for matrix in (A, B):
        digest.update(np.ascontiguousarray(np.asarray(matrix), dtype="<f4").tobytes())
    return digest.hexdigest()


def check_tensors(config: AdapterConfig, tensors: Mapping[str, Any]) -> None:
    """Raise AdapterFileError unless ``tensors`` holds exactly what ``config`` describes."""
    expected = config.expected_shapes()
    if any(key in tensors for key in PROJECTION_KEYS):
        if config.max_in is None:
            raise AdapterFileError("the adapter stores projections but its metadata gives no max_in")
        expected[PROJECTION_KEYS[0]] = (config.r, config.max_in)
        expected[PROJECTION_KEYS[1]] = (config.max_out, config.r)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise AdapterFileError(f"the adapter is missing tensors: {', '.join(missing)}")
    if unexpected:
        raise AdapterFileError(f"the adapter has tensors its metadata does not describe: {', '.join(unexpected)}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise AdapterFileError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")


def safetensors_module(framework: str) -> Any:
    """The safetensors reader/writer module for ``framework`` ("numpy" or "torch")."""
    if framework not in ("numpy", "torch"):
        raise ValueError(f"framework must be 'numpy' or 'torch', got {framework!r}")
    return importlib.import_module(f"safetensors.{framework}")


def write_atomically(path: str | os.PathLike[str], write: Any) -> None:
    """Call ``write(temporary_path)``, then move the result onto ``path`` in one step.

    A failure leaves ``path`` as it was and removes the temporary file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_adapter_file(
    path: str | os.PathLike[str],
    config: AdapterConfig,
    tensors: Mapping[str, Any],
    *,
    framework: str = "numpy",
) -> None:
    """Write an adapter file atomically after checking ``tensors`` against ``config``.

    Parameters
    ----------
    path : path
        Destination ``.safetensors`` file.
    config : AdapterConfig
        The metadata.
    tensors : mapping of str to array
        Host arrays of ``framework`` (numpy arrays, or CPU torch tensors).
    framework : {"numpy", "torch"}
        Which safetensors writer to use.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> cfg = AdapterConfig(r=2, seed=0, max_in=3, max_out=4, layers={"fc": LayerSpec(4, 2, 3)})
    >>> t = {"fc.lambda_d": np.full(2, 0.1, np.float32), "fc.lambda_b": np.zeros(4, np.float32)}
    >>> f = os.path.join(tempfile.mkdtemp(), "a.safetensors")
    >>> save_adapter_file(f, cfg, t)
    >>> load_adapter_file(f)[0] == cfg
    True
    """
    check_tensors(config, tensors)
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "config": config.to_json()}
    module = safetensors_module(framework)
    contiguous = {name: _contiguous(array, framework) for name, array in tensors.items()}
    write_atomically(path, lambda temporary: module.save_file(contiguous, temporary, metadata=metadata))


def _contiguous(array: Any, framework: str) -> Any:
    if framework == "torch":
        return array.detach().contiguous()
    import numpy as np

    return np.ascontiguousarray(array)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return dict(handle.metadata() or {})
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise AdapterFileError(f"{path} is not a readable safetensors file: {error}") from error


def load_adapter_file(
    path: str | os.PathLike[str], *, framework: str = "numpy"
) -> tuple[AdapterConfig, dict[str, Any]]:
    """Read and validate an adapter file; return its config and host tensors.

    Raises AdapterFileError when the file is not a vera-core adapter, its format version
    is newer than this library's, or its tensors do not match its metadata.
    """
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT_NAME:
        raise AdapterFileError(f"{path} is not a vera-core adapter file (no 'format: {FORMAT_NAME}' metadata)")
    version = int(metadata.get("format_version", "0"))
    if not 1 <= version <= FORMAT_VERSION:
        raise AdapterFileError(f"{path} has format version {version}; this vera-core reads 1..{FORMAT_VERSION}")
    config = AdapterConfig.from_json(metadata.get("config", ""))
    module = safetensors_module(framework)
    try:
        tensors = dict(module.load_file(str(path)))
    except Exception as error:
        raise AdapterFileError(f"{path}: could not read its tensors: {error}") from error
    check_tensors(config, tensors)
    return config, tensors
