"""The safetensors container, read strictly and written atomically, with NumPy host arrays.

A safetensors file is an 8-byte little-endian header length, a JSON header (each
tensor's ``dtype``, ``shape`` and ``data_offsets``, plus an optional ``__metadata__``
object of strings) and the tensors' bytes. This reader trusts none of it:

* only a regular file is opened (a FIFO, a device such as ``/dev/zero`` or a folder is
  refused at once, without reading), and a file larger than the caller's limit is
  refused before it is read;
* the header length must fit the file; text, pickles (``.pt``/``.bin``) and zip
  archives are recognised and named in the error;
* the header is strict JSON (no duplicate keys, no NaN), every entry has exactly its
  three fields with the right types, known dtypes, and byte ranges that match their
  shapes and tile the data section exactly (no overlap, no gap, nothing after).

Every refusal is an :class:`~vera_core.errors.AdapterFileError` (or
:class:`~vera_core.errors.NotAnAdapterError` for what is not a safetensors file at all).
The writer lays tensors out in name order after a space-padded header and goes through
:func:`vera_core.atomic.write_file`. :func:`tensor_digest` is the SHA-256 recorded as
``payload_sha256``.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vera_core import _strict as s
from vera_core.atomic import write_file
from vera_core.errors import AdapterFileError, AdapterTooLargeError, NotAnAdapterError

if TYPE_CHECKING:
    import numpy as np

DTYPES: dict[str, tuple[str | None, int]] = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),  # the raw bits; see widen_float
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U64": ("<u8", 8),
    "U32": ("<u4", 4),
    "U16": ("<u2", 2),
    "U8": ("u1", 1),
    "BOOL": ("?", 1),
    "F8_E4M3": (None, 1),
    "F8_E5M2": (None, 1),
}
"""safetensors dtype code -> (NumPy dtype of the stored bytes, or None where NumPy has none; bytes per element)."""

FLOAT_CODES = ("F64", "F32", "F16", "BF16")

MAX_HEADER_BYTES = 100_000_000
"""The largest JSON header read (the safetensors library's own limit)."""

METADATA_KEY = "__metadata__"


def _kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(
    path: str | os.PathLike[str], what: str, *, max_bytes: int | None = None, limit: str = "the limit of {:,}"
) -> bytearray:
    """The whole content of a regular file, refusing anything else before reading it.

    Parameters
    ----------
    path : path
        The file.
    what : str
        What the file should be, for messages ("an adapter file").
    max_bytes : int, optional
        Refuse (:class:`AdapterTooLargeError`) a larger file before reading.
    limit : str
        What ``max_bytes`` is, for the message (``{:,}`` stands for the number).

    Raises
    ------
    NotAnAdapterError
        Missing, unreadable, or not a regular file (a FIFO, a device, a folder).
    AdapterTooLargeError
        Larger than ``max_bytes``.

    Examples
    --------
    >>> read_regular_file("/dev/zero", "an adapter file")
    Traceback (most recent call last):
    ...
    vera_core.errors.NotAnAdapterError: /dev/zero is a character device, not an adapter file
    """
    name = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading must not wait for a writer
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        reason = {
            errno.ENOENT: "no such file",
            errno.EACCES: "permission denied",
            errno.ENOTDIR: "a parent is not a folder",
            errno.ELOOP: "too many symbolic links",
            errno.ENAMETOOLONG: "the name is too long",
        }.get(error.errno or 0, error.strerror or type(error).__name__)
        raise NotAnAdapterError(f"{name}: {reason}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotAnAdapterError(f"{name} is {_kind_of(info.st_mode)}, not {what}")
        if max_bytes is not None and info.st_size > max_bytes:
            raise AdapterTooLargeError(f"{name} is {info.st_size:,} bytes, over {limit.format(max_bytes)}")
        content = bytearray(info.st_size)
        view, done = memoryview(content), 0
        with os.fdopen(os.dup(fd), "rb", buffering=0) as handle:
            while done < info.st_size:
                count = handle.readinto(view[done:])
                if not count:
                    raise AdapterFileError(f"{name} shrank while it was read")
                done += count
        return content
    except OSError as error:
        raise AdapterFileError(f"{name}: cannot read it ({error.strerror or error})") from None
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors header: dtype code, shape, byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Contents:
    """A parsed safetensors file: its metadata, its tensor entries, and the bytes they point into."""

    name: str
    metadata: dict[str, str]
    entries: dict[str, Entry]
    data: memoryview
    """The data section (after the header)."""
    size: int
    """Bytes in the whole file."""

    def raw(self, key: str) -> np.ndarray:
        """Tensor ``key`` as stored (BF16 as its uint16 bits), read-only, no copy.

        Raises AdapterFileError for the float8 dtypes, which NumPy cannot hold.
        """
        import numpy as np

        entry = self.entries[key]
        dtype = DTYPES[entry.dtype][0]
        if dtype is None:
            raise AdapterFileError(f"tensor {key!r} has dtype {entry.dtype}, which NumPy cannot represent")
        array = np.frombuffer(self.data[entry.start : entry.stop], dtype=dtype).reshape(entry.shape)
        array.flags.writeable = False
        return array

    def digest(self, keys: Iterable[str], *, config: bytes = b"") -> str:
        """:func:`tensor_digest` of the tensors ``keys`` as stored (and of ``config``)."""
        chosen = [(key, self.entries[key]) for key in keys]
        items = [(key, e.dtype, e.shape, self.data[e.start : e.stop]) for key, e in chosen]
        return tensor_digest(items, config=config)


def _sniff(head: bytes) -> str:
    """What a file that is not safetensors seems to be, from its first bytes."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it is a Python pickle (a PyTorch .pt/.bin file?); vera-core never unpickles files"
    if head[:4] == b"PK\x03\x04":
        return "it is a zip archive (PyTorch's torch.save format?); vera-core reads .safetensors files only"
    if head[:1] in (b"{", b"[") or (head and all(32 <= byte < 127 or byte in (9, 10, 13) for byte in head)):
        preview = head.split(b"\n")[0][:24].decode("ascii", "replace")
        return f"it starts with text ({s.shown(preview)})"
    return "its first 8 bytes give no header length that fits it"


def _entry(key: str, value: Any, data_bytes: int) -> Entry:
    where = f"header entry {s.shown(key, 80)}"
    found = s.fields(where, value, required=("dtype", "shape", "data_offsets"))
    code = s.string(f"{where} dtype", found["dtype"])
    if code not in DTYPES:
        raise AdapterFileError(f"{where} has dtype {s.shown(code)}, which this reader does not know")
    shape = found["shape"]
    if not isinstance(shape, list) or len(shape) > 8 or not all(s.is_int(n) and n >= 0 for n in shape):
        s.refuse(f"{where} shape", "a list of at most 8 non-negative integers", shape)
    offsets = found["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(s.is_int(n) for n in offsets):
        s.refuse(f"{where} data_offsets", "a list of two integers", offsets)
    start, stop = offsets
    if not 0 <= start <= stop <= data_bytes:
        raise AdapterFileError(f"{where} has data_offsets {offsets}, outside the {data_bytes:,} data bytes")
    expected = math.prod(shape) * DTYPES[code][1]
    if stop - start != expected:
        raise AdapterFileError(
            f"{where} has {stop - start:,} bytes for shape {tuple(shape)} of {code}, which needs {expected:,}"
        )
    return Entry(code, tuple(shape), start, stop)


def parse(name: str, content: bytearray) -> Contents:
    """Parse a whole safetensors file held in memory (see the module docstring for the checks).

    Examples
    --------
    >>> parse("x", bytearray(b"hello world, not a tensor file"))
    Traceback (most recent call last):
    ...
    vera_core.errors.NotAnAdapterError: x is not a safetensors file: it starts with text ('hello world, not a tens...')
    """
    if len(content) < 8:
        raise NotAnAdapterError(f"{name} is not a safetensors file: {len(content)} bytes, too short for a header")
    header_bytes = int.from_bytes(content[:8], "little")
    if header_bytes < 2 or header_bytes > min(len(content) - 8, MAX_HEADER_BYTES):
        raise NotAnAdapterError(f"{name} is not a safetensors file: {_sniff(bytes(content[:64]))}")
    header = s.parse_json(bytes(content[8 : 8 + header_bytes]), f"{name}'s safetensors header")
    if not isinstance(header, dict):
        raise AdapterFileError(f"{name}'s safetensors header is {s.shown(header)}, not a JSON object")
    data = memoryview(content)[8 + header_bytes :]
    metadata: dict[str, str] = {}
    if METADATA_KEY in header:
        raw = s.mapping(f"{name}'s safetensors {METADATA_KEY}", header.pop(METADATA_KEY))
        for key, value in raw.items():
            where = f"{name}'s safetensors {METADATA_KEY}[{s.shown(key, 40)}]"
            metadata[key] = s.string(where, value, max_length=10**8)
    entries = {key: _entry(key, value, len(data)) for key, value in header.items()}
    position = 0
    for key, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].stop)):
        if entry.start != position:
            gap = entry.start - position
            problem = "overlaps another" if gap < 0 else f"leaves a gap of {gap} bytes"
            raise AdapterFileError(f"{name}: tensor {s.shown(key, 80)}'s data {problem}")
        position = entry.stop
    if position != len(data):
        raise AdapterFileError(f"{name}: {len(data) - position:,} bytes after the last tensor's data")
    return Contents(name, metadata, entries, data, len(content))


def read(path: str | os.PathLike[str], what: str, *, max_bytes: int | None = None) -> Contents:
    """:func:`read_regular_file` then :func:`parse`; ``max_bytes`` is the loader's byte budget."""
    limit = "the byte budget of {:,} (raise it with max_bytes=, $VERA_MAX_ADAPTER_BYTES or --max-bytes)"
    return parse(os.fspath(path), read_regular_file(path, what, max_bytes=max_bytes, limit=limit))


def widen_float(array: np.ndarray, code: str) -> np.ndarray:
    """A real floating tensor as float32 or float64 NumPy values, exactly.

    The rule: float32 and float64 are kept; float16 and bfloat16 widen to float32, which
    holds every value of both exactly (bfloat16 is the upper half of a float32's bits).
    Every other dtype is refused (AdapterFileError): integers and booleans are never cast.

    Examples
    --------
    >>> import numpy as np
    >>> widen_float(np.array([0x3F80, 0xC000], dtype=np.uint16), "BF16").tolist()
    [1.0, -2.0]
    """
    import numpy as np

    if code in ("F32", "F64"):
        return array
    if code == "F16":
        return array.astype(np.float32)
    if code == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    raise AdapterFileError(f"dtype {code} is not a real floating dtype (float16, bfloat16, float32, float64)")


def tensor_digest(items: Iterable[tuple[str, str, tuple[int, ...], Any]], *, config: bytes = b"") -> str:
    """SHA-256 over tensors given as ``(name, dtype code, shape, bytes)``, in name order.

    ``config`` (a vera-core file's config JSON, as stored) comes first when given: its byte
    count (8 bytes, little-endian) and bytes. Then each tensor contributes its UTF-8 name,
    dtype code and comma-joined shape (each followed by a zero byte), its byte count and
    its bytes as stored (little-endian): names, dtypes, shapes and values are all covered.

    Examples
    --------
    >>> len(tensor_digest([("a", "F32", (1,), b"\\0\\0\\0\\0")]))
    64
    """
    digest = hashlib.sha256()
    if config:
        digest.update(len(config).to_bytes(8, "little"))
        digest.update(config)
    for name, code, shape, data in sorted(items, key=lambda item: item[0]):
        digest.update(f"{name}\0{code}\0{','.join(map(str, shape))}\0".encode())
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _code_of(array: np.ndarray) -> str:
    kind = array.dtype.kind + str(array.dtype.itemsize)
    codes = {
        "f8": "F64",
        "f4": "F32",
        "f2": "F16",
        "i8": "I64",
        "i4": "I32",
        "i2": "I16",
        "i1": "I8",
        "u8": "U64",
        "u4": "U32",
        "u2": "U16",
        "u1": "U8",
        "b1": "BOOL",
    }
    if kind not in codes:
        raise TypeError(f"cannot store dtype {array.dtype} in a safetensors file")
    return codes[kind]


def host_layout(tensors: Mapping[str, Any]) -> dict[str, tuple[str, np.ndarray]]:
    """Each array as ``(dtype code, little-endian C-contiguous flat bytes view)``."""
    import numpy as np

    laid: dict[str, tuple[str, np.ndarray]] = {}
    for name, value in tensors.items():
        array = np.asarray(value)
        code = _code_of(array)
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        laid[name] = (code, little)
    return laid


def flat_bytes(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, as a flat memoryview (no copy)."""
    return array.reshape(-1).view("u1").data


def layout_digest(laid: Mapping[str, tuple[str, np.ndarray]], *, config: bytes = b"") -> str:
    """:func:`tensor_digest` of :func:`host_layout`'s result (what :func:`write` will store)."""
    items = ((name, code, array.shape, flat_bytes(array)) for name, (code, array) in laid.items())
    return tensor_digest(items, config=config)


def write(path: str | os.PathLike[str], tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Write NumPy arrays (any shape, float/int/bool dtypes) as a safetensors file, atomically.

    Tensors are laid out in name order; the header is padded with spaces to a multiple of
    8 bytes, so every tensor starts 8-byte aligned relative to the data section when the
    sizes allow.
    """
    laid = host_layout(tensors)
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA_KEY] = {str(key): str(value) for key, value in metadata.items()}
    position = 0
    for name in sorted(laid):
        code, array = laid[name]
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [position, position + array.nbytes]}
        position += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def emit(temporary: str) -> None:
        with Path(temporary).open("wb") as handle:
            handle.write(len(text).to_bytes(8, "little"))
            handle.write(text)
            for name in sorted(laid):
                array = laid[name][1]
                if array.nbytes:
                    handle.write(flat_bytes(array))

    write_file(path, emit)
