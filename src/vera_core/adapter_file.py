"""The vera-core adapter file: one safetensors file, vectors plus JSON metadata.

Tensors (host arrays; every backend converts to and from NumPy):

* ``<layer>.lambda_d`` (rank,), ``<layer>.lambda_b`` (out,) for every adapted layer;
* ``<layer>.magnitude`` (out,) for DVoRA;
* ``<layer>.bias`` (out,) when biases were trained (``bias`` "all" or "vera_only"),
  and ``<module>.bias`` for the other modules listed in ``bias_modules`` (``bias="all"``
  trains every bias of the model);
* ``projections.A`` (r, max_in) and ``projections.B`` (max_out, r) only when stored.

All are real floating tensors (float16, bfloat16, float32 or float64).

The safetensors header's ``__metadata__`` holds exactly ``format`` (``"vera-core"``),
``format_version`` (``"1"``), ``config`` (the :class:`AdapterConfig` as JSON) and
``payload_sha256`` (:func:`vera_core.safetensors_file.tensor_digest` of the config text
and every tensor in the file: a changed bit in any vector, or in the config, is detected
on load; files written before it existed lack it and still load). The projections are normally *not* stored: they are
regenerated from ``seed`` with the generator ``prng_id``/``prng_version``, and
``projections_sha256`` (of the float32 little-endian bytes of A then B, required)
detects a generator that disagrees. Files are written atomically
(:func:`vera_core.atomic.write_file`).

The config is parsed strictly (:meth:`AdapterConfig.from_json`): every field has one
JSON type (booleans are ``true``/``false``, integers are integers), unknown fields are
refused, and so are unknown keys of ``extra``, which may hold ``detach_norm`` (bool),
``requested_r`` (int), ``framework`` (str) and ``peft_config`` (a PEFT VeRA config).
Reading goes through :func:`vera_core.loading.read_adapter`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from vera_core import _strict as s
from vera_core import safetensors_file
from vera_core.errors import AdapterFileError
from vera_core.peft_config import BIAS_MODES, MAX_SIZE, parse_peft_config
from vera_core.projections import PRNG_ID, PRNG_VERSION

__all__ = [
    "BIAS_MODES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METHODS",
    "PROJECTION_KEYS",
    "AdapterConfig",
    "AdapterFileError",
    "LayerSpec",
    "check_adapter_options",
    "check_tensors",
    "projection_checksum",
    "save_adapter_file",
]

FORMAT_NAME = "vera-core"
FORMAT_VERSION = 1
METHODS = ("vera", "dvora")
PROJECTION_KEYS = ("projections.A", "projections.B")
METADATA_KEYS = ("format", "format_version", "config", "payload_sha256")
"""Every key of a vera-core file's ``__metadata__`` (``payload_sha256`` may be absent)."""

_SHA256 = re.compile(r"[0-9a-f]{64}")
_EXTRA = {"detach_norm", "requested_r", "framework", "peft_config"}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One adapted layer: its sizes, rank and weight layout (every field type-checked)."""

    out_features: int
    rank: int
    in_features: int | None = None
    """None when the file does not say (PEFT files); known once attached to a model."""
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        check_layer("layer", self)


def check_layer(where: str, spec: Any) -> None:
    """Raise AdapterFileError unless ``spec`` is a :class:`LayerSpec` with valid fields."""
    if not isinstance(spec, LayerSpec):
        s.refuse(where, "a LayerSpec", spec)
    s.integer(f"{where}.out_features", spec.out_features, low=1, high=MAX_SIZE)
    s.integer(f"{where}.rank", spec.rank, low=1, high=MAX_SIZE)
    s.optional(s.integer)(f"{where}.in_features", spec.in_features, low=1, high=MAX_SIZE)
    s.boolean(f"{where}.fan_in_fan_out", spec.fan_in_fan_out)


def _check_extra(extra: Mapping[str, Any]) -> None:
    unknown = sorted(set(extra) - _EXTRA)
    if unknown:
        listed = ", ".join(map(s.shown, unknown[:5]))
        raise AdapterFileError(f"config field 'extra' has unknown keys {listed}; known: {', '.join(sorted(_EXTRA))}")
    if "detach_norm" in extra:
        s.boolean("config field 'extra.detach_norm'", extra["detach_norm"])
    if "requested_r" in extra:
        s.integer("config field 'extra.requested_r'", extra["requested_r"], low=1, high=MAX_SIZE)
    if "framework" in extra:
        s.string("config field 'extra.framework'", extra["framework"], max_length=100)
    if "peft_config" in extra:
        parse_peft_config(extra["peft_config"], "config field 'extra.peft_config'")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Everything besides the vectors that an adapter needs, stored in the file's header.

    Every field is checked on construction (AdapterFileError naming the field), so a
    config that exists can be written and read back.

    Examples
    --------
    >>> cfg = AdapterConfig(r=4, seed=0, max_in=8, max_out=6, layers={"fc": LayerSpec(6, 4, 8)})
    >>> AdapterConfig.from_json(cfg.to_json()) == cfg
    True
    >>> AdapterConfig(r=4.0, seed=0, max_in=8, max_out=6, layers={"fc": LayerSpec(6, 4, 8)})
    Traceback (most recent call last):
    ...
    vera_core.errors.AdapterFileError: config field 'r' must be an integer in [1, 4294967295], got 4.0 (a number)
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
    """None, a string or a list of strings (as given to ``add_vera``)."""
    bias_modules: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Modules besides ``layers`` whose trained biases the file holds (``bias="all"``): name -> size."""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Details: ``detach_norm``, ``requested_r``, ``framework``, ``peft_config`` (nothing else)."""

    def __post_init__(self) -> None:
        field = "config field"
        s.integer(f"{field} 'r'", self.r, low=1, high=MAX_SIZE)
        s.integer(f"{field} 'seed'", self.seed, low=0, high=2**64 - 1)
        s.optional(s.integer)(f"{field} 'max_in'", self.max_in, low=1, high=MAX_SIZE)
        s.integer(f"{field} 'max_out'", self.max_out, low=1, high=MAX_SIZE)
        s.string(f"{field} 'method'", self.method, choices=METHODS)
        object.__setattr__(self, "d_initial", s.finite(f"{field} 'd_initial'", self.d_initial))
        object.__setattr__(self, "dropout", s.finite(f"{field} 'dropout'", self.dropout, low=0.0, below=1.0))
        s.string(f"{field} 'bias'", self.bias, choices=BIAS_MODES)
        s.string(f"{field} 'prng_id'", self.prng_id, max_length=200)
        s.integer(f"{field} 'prng_version'", self.prng_version, low=1, high=2**31 - 1)
        if self.projections_sha256 is not None and not (
            isinstance(self.projections_sha256, str) and _SHA256.fullmatch(self.projections_sha256)
        ):
            s.refuse(f"{field} 'projections_sha256'", "null or 64 lowercase hex digits", self.projections_sha256)
        object.__setattr__(self, "target_modules", s.names_or_pattern(f"{field} 'target_modules'", self.target_modules))
        layers = s.mapping(f"{field} 'layers'", self.layers)
        if not layers:
            raise AdapterFileError("config field 'layers' is empty: an adapter must adapt at least one layer")
        for name, spec in layers.items():
            where = f"config layer {s.shown(name, 80)}"
            if not name:
                raise AdapterFileError("config field 'layers' has a layer with an empty name")
            check_layer(where, spec)
            if spec.rank > self.r:
                raise AdapterFileError(f"{where} has rank {spec.rank}, above r={self.r}")
            if spec.out_features > self.max_out:
                raise AdapterFileError(f"{where} has {spec.out_features} outputs, above max_out={self.max_out}")
            if spec.in_features is not None and self.max_in is not None and spec.in_features > self.max_in:
                raise AdapterFileError(f"{where} has {spec.in_features} inputs, above max_in={self.max_in}")
        object.__setattr__(self, "layers", layers)
        bias_modules = s.mapping(f"{field} 'bias_modules'", self.bias_modules)
        if bias_modules and self.bias != "all":
            raise AdapterFileError(f"bias_modules are stored only with bias='all', not bias={self.bias!r}")
        for name, size in bias_modules.items():
            if not name or name in layers:
                raise AdapterFileError(f"config field 'bias_modules' lists {s.shown(name)}, an adapted layer or empty")
            s.integer(f"config field 'bias_modules[{s.shown(name, 80)}]'", size, low=1, high=MAX_SIZE)
        object.__setattr__(self, "bias_modules", bias_modules)
        extra = s.mapping(f"{field} 'extra'", self.extra)
        _check_extra(extra)
        object.__setattr__(self, "extra", extra)

    @property
    def detach_norm(self) -> bool:
        """``extra["detach_norm"]``, False when absent."""
        return bool(self.extra.get("detach_norm", False))

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> AdapterConfig:
        """Parse :meth:`to_json`'s output strictly, raising AdapterFileError naming the bad field.

        ``r``, ``seed``, ``max_in``, ``max_out`` and ``layers`` are required (and each
        layer's ``out_features`` and ``rank``); the others default as in the class.
        """
        raw = s.fields(
            "config",
            s.parse_json(text, "config"),
            required=("r", "seed", "max_in", "max_out", "layers"),
            optional_fields=[f.name for f in dataclasses.fields(cls)],
        )
        layers = s.mapping("config field 'layers'", raw["layers"])
        specs = {}
        for name, spec in layers.items():
            where = f"config layer {s.shown(name, 80)}"
            values = s.fields(
                where, spec, required=("out_features", "rank"), optional_fields=("in_features", "fan_in_fan_out")
            )
            for key in ("out_features", "rank"):  # named here, before LayerSpec's own check
                s.integer(f"{where}.{key}", values[key], low=1, high=MAX_SIZE)
            s.optional(s.integer)(f"{where}.in_features", values.get("in_features"), low=1, high=MAX_SIZE)
            s.boolean(f"{where}.fan_in_fan_out", values.get("fan_in_fan_out", False))
            specs[name] = LayerSpec(**values)
        raw["layers"] = specs
        return cls(**raw)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every vector tensor the file must hold, with its shape (projections excluded)."""
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

    def projection_shapes(self, max_in: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
        """The shapes of A (r, max_in) and B (max_out, r); ``max_in`` when the config lacks it."""
        width = self.max_in if self.max_in is not None else max_in
        if width is None:
            raise AdapterFileError("the adapter does not record max_in; give the largest input features of its layers")
        return (self.r, width), (self.max_out, self.r)


def check_adapter_options(r: Any, seed: Any, d_initial: Any, dropout: Any, bias: Any) -> None:
    """Raise ValueError unless the options of a new adapter are valid (what a config can record).

    Examples
    --------
    >>> check_adapter_options(4, 0, float("nan"), 0.0, "none")
    Traceback (most recent call last):
    ...
    ValueError: d_initial must be a finite number, got nan
    """
    if not s.is_int(r) or not 1 <= r <= MAX_SIZE:
        raise ValueError(f"r must be a positive int, got {s.shown(r)}")
    if not s.is_int(seed) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {s.shown(seed)}")
    if not (isinstance(d_initial, float) or s.is_int(d_initial)) or not math.isfinite(d_initial):
        raise ValueError(f"d_initial must be a finite number, got {s.shown(d_initial)}")
    if not (isinstance(dropout, float) or s.is_int(dropout)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {s.shown(dropout)}")
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {s.shown(bias)}")


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
    """Raise AdapterFileError unless ``tensors`` holds exactly what ``config`` describes.

    Projections are optional; when one is present both must be, with the config's shapes.
    """
    expected = config.expected_shapes()
    if any(key in tensors for key in PROJECTION_KEYS):
        shape_A, shape_B = config.projection_shapes()
        expected[PROJECTION_KEYS[0]], expected[PROJECTION_KEYS[1]] = shape_A, shape_B
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise AdapterFileError(f"the adapter is missing tensors: {', '.join(map(s.shown, missing[:8]))}")
    if unexpected:
        raise AdapterFileError(
            f"the adapter has tensors its metadata does not describe: {', '.join(map(s.shown, unexpected[:8]))}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise AdapterFileError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")


def save_adapter_file(path: str | os.PathLike[str], config: AdapterConfig, tensors: Mapping[str, Any]) -> None:
    """Write an adapter file atomically after checking ``tensors`` against ``config``.

    Parameters
    ----------
    path : path
        Destination ``.safetensors`` file.
    config : AdapterConfig
        The metadata; ``projections_sha256`` is required.
    tensors : mapping of str to array
        NumPy arrays of a real floating dtype (backends convert theirs with
        ``to_host``), finite.

    Raises
    ------
    AdapterFileError
        Tensors that do not fit ``config``, a non-floating dtype, NaN or infinity, or no
        ``projections_sha256`` (nothing to verify the projections against on load).

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from vera_core.loading import read_adapter
    >>> cfg = AdapterConfig(r=2, seed=0, max_in=3, max_out=4, layers={"fc": LayerSpec(4, 2, 3)},
    ...                     projections_sha256="0" * 64)
    >>> t = {"fc.lambda_d": np.full(2, 0.1, np.float32), "fc.lambda_b": np.zeros(4, np.float32)}
    >>> f = os.path.join(tempfile.mkdtemp(), "a.safetensors")
    >>> save_adapter_file(f, cfg, t)
    >>> read_adapter(f).config == cfg
    True
    """
    import numpy as np

    if config.projections_sha256 is None:
        raise AdapterFileError("the config records no projections_sha256; a vera-core file needs one")
    check_tensors(config, tensors)
    host = {name: np.asarray(value) for name, value in tensors.items()}
    for name, value in host.items():
        if value.dtype.kind != "f":
            raise AdapterFileError(f"tensor {name!r} has dtype {value.dtype}; adapter tensors are real floating")
        if not np.all(np.isfinite(value)):
            raise AdapterFileError(f"tensor {name!r} holds NaN or infinity; refusing to write it")
    laid = safetensors_file.host_layout(host)
    text = config.to_json()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": text,
        "payload_sha256": safetensors_file.layout_digest(laid, config=text.encode()),
    }
    safetensors_file.write(path, {name: array for name, (_, array) in laid.items()}, metadata)
