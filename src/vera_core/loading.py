"""The one way in: read and verify a vera-core adapter file or a PEFT VeRA folder.

:func:`read_adapter` is the only reader of adapters; every backend and every CLI command
goes through it. It returns a :class:`VerifiedAdapter` whose every part was checked:

* the path is a regular file (our format) or a folder (PEFT), never a FIFO or device;
* the byte budget (:func:`byte_budget`) holds *before* anything is allocated: the file
  size, and what its config would make the loader allocate (the projections,
  ``4 * (r * max_in + max_out * r)`` bytes, and the vectors as float32);
* the safetensors container is valid (:mod:`vera_core.safetensors_file`);
* the config is parsed strictly (:meth:`AdapterConfig.from_json`,
  :func:`vera_core.peft_config.parse_peft_config`);
* the tensors are exactly those the config describes, with its shapes, real floating
  dtypes (float16/bfloat16 widened exactly to float32) and finite values;
* the ``payload_sha256`` recorded on save, when present, matches the tensors;
* stored projections match ``projections_sha256``.

The projections themselves come from :meth:`VerifiedAdapter.projections`: the stored
ones, or ones regenerated with the recorded generator and checked against
``projections_sha256``. Regenerated pairs are kept in a :class:`ProjectionCache` keyed
by ``(prng_id, prng_version, seed, r, max_in, max_out)``, so loading many adapters that
share a key generates and hashes their projections once.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vera_core import _strict as s
from vera_core import generators, safetensors_file
from vera_core.adapter_file import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_KEYS,
    PROJECTION_KEYS,
    AdapterConfig,
    check_tensors,
    projection_checksum,
)
from vera_core.errors import (
    AdapterFileError,
    AdapterTooLargeError,
    NotAnAdapterError,
    PayloadMismatchError,
    ProjectionMismatchError,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FORMAT_OURS",
    "FORMAT_PEFT",
    "MAX_BYTES_ENV",
    "ProjectionCache",
    "VerifiedAdapter",
    "byte_budget",
    "parse_byte_size",
    "read_adapter",
]

FORMAT_OURS = FORMAT_NAME
FORMAT_PEFT = "peft"

DEFAULT_MAX_BYTES = 2**30
"""The default byte budget of one load: 1 GiB (an r=1024 adapter of a 70B model needs about 0.3 GiB)."""

MAX_BYTES_ENV = "VERA_MAX_ADAPTER_BYTES"
"""Environment variable overriding :data:`DEFAULT_MAX_BYTES` (an explicit argument wins)."""

_SIZE = re.compile(r"\s*(\d+)\s*(|[KMGT]i?B?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_byte_size(text: str) -> int:
    """A positive byte count from ``"1073741824"``, ``"512MiB"``, ``"2G"`` (binary units).

    Examples
    --------
    >>> parse_byte_size("2GiB"), parse_byte_size("4096")
    (2147483648, 4096)
    """
    match = _SIZE.fullmatch(text)
    if match is None or int(match[1]) <= 0:
        raise ValueError(f"a byte size must be a positive integer, optionally with K, M, G or T(iB); got {text!r}")
    return int(match[1]) * _UNITS[match[2][:1].lower()]


def byte_budget(max_bytes: int | None = None) -> int:
    """The byte budget of a load: ``max_bytes``, else ``$VERA_MAX_ADAPTER_BYTES``, else 1 GiB.

    Examples
    --------
    >>> byte_budget(4096)
    4096
    """
    if max_bytes is not None:
        if not s.is_int(max_bytes) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        return int(max_bytes)
    text = os.environ.get(MAX_BYTES_ENV)
    if text is None or not text.strip():
        return DEFAULT_MAX_BYTES
    try:
        return parse_byte_size(text)
    except ValueError as error:
        raise ValueError(f"${MAX_BYTES_ENV}: {error}") from None


def _check_budget(needed: int, budget: int, what: str) -> None:
    if needed > budget:
        raise AdapterTooLargeError(
            f"loading needs about {needed:,} bytes ({what}), over the byte budget of {budget:,}; "
            f"raise it with max_bytes=, ${MAX_BYTES_ENV} or --max-bytes if the adapter is trusted"
        )


def _projection_bytes(r: int, max_in: int, max_out: int) -> int:
    return 4 * (r * max_in + max_out * r)


@dataclasses.dataclass(frozen=True)
class CachedProjections:
    """A regenerated pair (read-only float32 NumPy arrays) and its :func:`projection_checksum`."""

    A: np.ndarray
    B: np.ndarray
    sha256: str


class ProjectionCache:
    """Regenerated projections by ``(prng_id, prng_version, seed, r, max_in, max_out)``.

    Each distinct key is generated and hashed once; the least recently used pairs beyond
    ``max_entries`` are dropped. The arrays are read-only. Thread-safe.

    Examples
    --------
    >>> cache = ProjectionCache()
    >>> first = cache.get("threefry2x32-20", 1, 0, 4, 8, 6)
    >>> cache.get("threefry2x32-20", 1, 0, 4, 8, 6) is first, cache.misses, cache.hits
    (True, 1, 1)
    """

    def __init__(self, max_entries: int = 8) -> None:
        if not s.is_int(max_entries) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._pairs: collections.OrderedDict[tuple[Any, ...], CachedProjections] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pairs)

    def clear(self) -> None:
        """Drop every pair and reset the counters."""
        with self._lock:
            self._pairs.clear()
            self.hits = self.misses = 0

    def get(self, prng_id: str, prng_version: int, seed: int, r: int, max_in: int, max_out: int) -> CachedProjections:
        """The pair for the key, generated (:func:`vera_core.generators.regenerate`) on first use."""
        key = (prng_id, prng_version, seed, r, max_in, max_out)
        with self._lock:
            found = self._pairs.get(key)
            if found is not None:
                self._pairs.move_to_end(key)
                self.hits += 1
                return found
            A, B = generators.regenerate(prng_id, prng_version, seed, r, max_in, max_out)
            A.flags.writeable = False
            B.flags.writeable = False
            found = CachedProjections(A, B, projection_checksum(A, B))
            self._pairs[key] = found
            self.misses += 1
            while len(self._pairs) > self.max_entries:
                self._pairs.popitem(last=False)
            return found


DEFAULT_CACHE = ProjectionCache()
"""The cache :meth:`VerifiedAdapter.projections` uses unless given another."""


@dataclasses.dataclass(frozen=True)
class VerifiedAdapter:
    """An adapter read by :func:`read_adapter`: every part checked, host (NumPy) arrays, read-only.

    Attributes
    ----------
    path : Path
        The file or folder read.
    format : {"vera-core", "peft"}
        Which format it is in.
    config : AdapterConfig
        The strictly parsed config (a PEFT folder's translated; ``in_features`` and
        ``max_in`` are None there unless the projections are stored).
    vectors : mapping of str to ndarray
        Every tensor but the projections, by vera-core name (``<layer>.lambda_d``,
        ``.lambda_b``, ``.magnitude``, ``.bias``), float32 or float64.
    stored : tuple of ndarray or None
        ``(A, B)`` when the file stores them (already checked against the checksum).
    payload_sha256 : str or None
        The tensors' digest recorded in the file (verified), None for files without one.
    file_bytes : int
        Bytes on disk (the file, or the folder's two files).
    max_bytes : int
        The byte budget it was read under (also bounds :meth:`projections`).
    """

    path: Path
    format: str
    config: AdapterConfig
    vectors: Mapping[str, np.ndarray]
    stored: tuple[np.ndarray, np.ndarray] | None
    payload_sha256: str | None
    file_bytes: int
    max_bytes: int

    @property
    def trainable_parameters(self) -> int:
        """Number of stored adapter parameters (vectors, magnitudes, biases)."""
        return int(sum(v.size for v in self.vectors.values()))

    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor by vera-core name: the vectors, and ``projections.A``/``.B`` when stored."""
        found = dict(self.vectors)
        if self.stored is not None:
            found[PROJECTION_KEYS[0]], found[PROJECTION_KEYS[1]] = self.stored
        return found

    def projections(
        self, max_in: int | None = None, *, cache: ProjectionCache | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The float32 (or stored float64) projections ``(A, B)``, verified.

        Stored ones are returned as read. Otherwise they are regenerated with the
        recorded generator (through ``cache``, default a module-wide one) and their
        SHA-256 must equal ``projections_sha256`` when the config records one (vera-core
        files always do; PEFT folders never do).

        Parameters
        ----------
        max_in : int, optional
            The largest input features of the layers that will use them. Required when
            the adapter does not record ``max_in`` (PEFT folders without stored
            projections); otherwise it must not exceed the recorded one.
        cache : ProjectionCache, optional
            Where regenerated pairs are kept.

        Raises
        ------
        ProjectionMismatchError
            The regenerated matrices' checksum differs from the recorded one.
        UnknownGeneratorError
            The generator is unknown, or is PEFT's and PyTorch is not installed.
        AdapterTooLargeError
            A ``max_in`` given here makes the projections exceed the byte budget.
        AdapterFileError
            ``max_in`` missing or too large.
        """
        config = self.config
        if max_in is not None:
            s.integer("max_in", max_in, low=1, high=2**32 - 1)
        width = config.max_in if config.max_in is not None else max_in
        if width is None:
            raise AdapterFileError(
                f"{self.path}: the projections are not stored and the adapter does not record max_in; "
                "give the largest input features of its layers"
            )
        if max_in is not None and max_in > width:
            raise AdapterFileError(f"{self.path}: layers with {max_in} inputs exceed the adapter's max_in={width}")
        if self.stored is not None:
            return self.stored
        if config.max_in is None:  # not counted when the file was read
            needed = _projection_bytes(config.r, width, config.max_out)
            _check_budget(needed, self.max_bytes, f"projections of r={config.r}, max_in={width}")
        pair = (DEFAULT_CACHE if cache is None else cache).get(
            config.prng_id, config.prng_version, config.seed, config.r, width, config.max_out
        )
        if config.projections_sha256 is not None and pair.sha256 != config.projections_sha256:
            raise ProjectionMismatchError(
                f"{self.path}: the projections regenerated from seed {config.seed} with {config.prng_id} "
                f"v{config.prng_version} do not match its projections_sha256 (a changed seed, rank or size, or "
                "a generator that differs from the one that wrote it)"
            )
        return pair.A, pair.B


@dataclasses.dataclass
class _Parsed:
    """What a format reader found, before any tensor is materialised."""

    format: str
    config: AdapterConfig
    contents: safetensors_file.Contents
    keys: dict[str, str]
    """vera-core tensor name -> key in the file."""
    payload_sha256: str | None
    file_bytes: int


def _read_ours(path: Path, budget: int) -> _Parsed:
    contents = safetensors_file.read(path, "a vera-core adapter file", max_bytes=budget)
    metadata = contents.metadata
    if metadata.get("format") != FORMAT_NAME:
        found = "no 'format' metadata" if "format" not in metadata else f"format {s.shown(metadata['format'])}"
        hint = " (a PEFT adapter? give its folder)" if metadata.get("format") == "pt" else ""
        raise NotAnAdapterError(f"{path} is a safetensors file but not a vera-core adapter ({found}){hint}")
    unknown = sorted(set(metadata) - set(METADATA_KEYS))
    if unknown:
        raise AdapterFileError(f"unknown metadata keys {', '.join(map(s.shown, unknown))}")
    if "config" not in metadata or "format_version" not in metadata:
        raise AdapterFileError("the metadata lacks 'config' or 'format_version'")
    if metadata["format_version"] not in [str(v) for v in range(1, FORMAT_VERSION + 1)]:
        raise AdapterFileError(
            f"format_version {s.shown(metadata['format_version'])}; this vera-core reads 1..{FORMAT_VERSION}"
        )
    config = AdapterConfig.from_json(metadata["config"])
    if config.projections_sha256 is None:
        raise AdapterFileError("the config records no projections_sha256, so its projections cannot be verified")
    keys = {name: name for name in contents.entries}
    if PROJECTION_KEYS[0] not in keys and PROJECTION_KEYS[1] not in keys:
        generators.check_known(config.prng_id, config.prng_version)
    digest = metadata.get("payload_sha256")
    if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
        s.refuse("metadata 'payload_sha256'", "64 lowercase hex digits", digest)
    return _Parsed(FORMAT_OURS, config, contents, keys, digest, contents.size)


def _materialise(parsed: _Parsed, budget: int) -> tuple[dict[str, np.ndarray], tuple[Any, Any] | None]:
    import numpy as np

    config, contents = parsed.config, parsed.contents
    check_tensors(config, {name: contents.entries[key] for name, key in parsed.keys.items()})
    elements = sum(contents.entries[key].size for key in parsed.keys.values())
    needed = parsed.file_bytes + 4 * elements
    what = f"file {parsed.file_bytes:,} bytes, vectors {elements:,} floats"
    if config.max_in is not None and PROJECTION_KEYS[0] not in parsed.keys:
        needed += _projection_bytes(config.r, config.max_in, config.max_out)
        what += f", projections r={config.r} x (max_in={config.max_in} + max_out={config.max_out})"
    _check_budget(needed, budget, what)
    if parsed.payload_sha256 is not None:
        config_text = contents.metadata.get("config", "").encode() if parsed.format == FORMAT_OURS else b""
        if contents.digest(parsed.keys.values(), config=config_text) != parsed.payload_sha256:
            raise PayloadMismatchError(
                "its tensors (or config) do not match the payload_sha256 recorded when it was written"
            )
    arrays: dict[str, np.ndarray] = {}
    for name, key in parsed.keys.items():
        code = contents.entries[key].dtype
        if code not in safetensors_file.FLOAT_CODES:
            raise AdapterFileError(
                f"tensor {s.shown(key, 80)} has dtype {code}; adapter tensors are float16, bfloat16, float32 or float64"
            )
        array = safetensors_file.widen_float(contents.raw(key), code)
        if not np.all(np.isfinite(array)):
            raise AdapterFileError(f"tensor {s.shown(key, 80)} holds NaN or infinity")
        array.flags.writeable = False
        arrays[name] = array
    stored = None
    if PROJECTION_KEYS[0] in arrays:
        stored = (arrays.pop(PROJECTION_KEYS[0]), arrays.pop(PROJECTION_KEYS[1]))
    return arrays, stored


def read_adapter(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> VerifiedAdapter:
    """Read and verify a vera-core adapter file or a PEFT VeRA folder (see the module docstring).

    Parameters
    ----------
    path : path
        A ``.safetensors`` file in vera-core's format, or a folder holding PEFT's
        ``adapter_config.json`` and ``adapter_model.safetensors``.
    max_bytes : int, optional
        The byte budget (default :func:`byte_budget`: ``$VERA_MAX_ADAPTER_BYTES`` or 1 GiB).

    Returns
    -------
    VerifiedAdapter

    Raises
    ------
    NotAnAdapterError
        Missing, not a regular file or folder, or in neither format (text, a pickle, ...).
    AdapterTooLargeError
        Over the byte budget, checked before allocating.
    PayloadMismatchError, ProjectionMismatchError
        The tensors or the stored projections differ from their recorded checksums.
    UnknownGeneratorError
        The projections are not stored and their generator is unknown here.
    AdapterFileError
        Anything else malformed: every message names the path and the field or tensor.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import vera_core as vc
    >>> from vera_core.adapter_file import AdapterConfig, LayerSpec, projection_checksum, save_adapter_file
    >>> A, B = vc.generate_projections(0, 2, 3, 4, xp=np)
    >>> cfg = AdapterConfig(r=2, seed=0, max_in=3, max_out=4, layers={"fc": LayerSpec(4, 2, 3)},
    ...                     projections_sha256=projection_checksum(A, B))
    >>> f = os.path.join(tempfile.mkdtemp(), "a.safetensors")
    >>> save_adapter_file(f, cfg, {"fc.lambda_d": np.full(2, 0.1, np.float32), "fc.lambda_b": np.zeros(4, np.float32)})
    >>> adapter = read_adapter(f)
    >>> adapter.format, sorted(adapter.vectors), bool(np.array_equal(adapter.projections()[0], A))
    ('vera-core', ['fc.lambda_b', 'fc.lambda_d'], True)
    """
    budget = byte_budget(max_bytes)
    source = Path(path)
    name = os.fspath(path)
    try:
        info = source.stat()
    except OSError:
        info = None  # the file reader names the reason
    is_folder = info is not None and stat.S_ISDIR(info.st_mode)
    if is_folder:
        from vera_core.peft_format import read_peft_folder

        reader = functools.partial(read_peft_folder, source, budget)
    else:
        reader = functools.partial(_read_ours, source, budget)
    try:
        parsed = reader()
        vectors, stored = _materialise(parsed, budget)
        config = parsed.config
        if stored is not None:
            digest = projection_checksum(*stored)
            if parsed.format == FORMAT_PEFT:
                config = dataclasses.replace(config, projections_sha256=digest)
            elif digest != config.projections_sha256:
                raise ProjectionMismatchError("its stored projections do not match its projections_sha256")
    except AdapterFileError as error:
        if str(error).startswith(name):
            raise
        raise type(error)(f"{name}: {error}") from None
    return VerifiedAdapter(
        source, parsed.format, config, vectors, stored, parsed.payload_sha256, parsed.file_bytes, budget
    )
