"""The corruption corpus: malformed adapter files and PEFT folders, generated (never committed).

Each :class:`Case` builds one input in a folder of its own and says what every loader
must do with it: raise a given exception type (``core``, ``numpy``, ``torch``), exit 1
with one line (the CLI commands), or succeed (the valid controls). The categories follow
issue 12: truncated, bit-flipped and empty files; every config field given a wrong type,
a negative, a huge value, removed, or joined by an unknown one; metadata and safetensors
header tampering; wrong tensors; pickles and ``.pt`` files; folders, FIFOs and devices;
wrong PEFT configs and weights; shapes that do not fit the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import vera_core as vc

from . import craft

LOADERS = ("core", "numpy", "torch", "inspect", "merge", "convert")
"""Every way in: the core loader, both backends, and the three CLI commands."""

AFE = "AdapterFileError"
NOT = "NotAnAdapterError"
BIG = "AdapterTooLargeError"
PROJ = "ProjectionMismatchError"
PAY = "PayloadMismatchError"
GEN = "UnknownGeneratorError"


@dataclasses.dataclass(frozen=True)
class Case:
    """One corpus input and what each loader must make of it."""

    name: str
    kind: str
    """``ours`` (a file), ``peft`` (a folder) or ``other`` (neither: loaded as a file)."""
    build: Callable[[Path], Path]
    expect: str | None
    """The exception class the Python loaders raise (None: the input is valid)."""
    exact: bool = True
    """False: any subclass of ``expect`` will do (e.g. bit flips, where the first check to fail varies)."""
    keyword: str | None = None
    """A word the message must contain (a field's name)."""
    fits: bool = True
    """False: the adapter is valid but does not fit the test model (only model loaders refuse it)."""
    needs_torch: bool = False
    """Its projections are PEFT's and not stored: regenerating them needs PyTorch."""
    refused_by: tuple[str, ...] = ()
    """Loaders that refuse this otherwise valid input (``convert``: PEFT has no DVoRA)."""

    def expected(self, loader: str, *, torch: bool = True) -> str | None:
        """The exception class name ``loader`` must raise, or None for success."""
        if self.needs_torch and not torch and loader in ("core", "numpy", "merge", "convert"):
            return GEN
        if loader in self.refused_by:
            return AFE
        if not self.fits and loader in ("numpy", "torch", "merge"):
            return self.expect or AFE
        if not self.fits:
            return None
        return self.expect


def _file(data: bytes | Callable[[], bytes], name: str = "adapter.safetensors") -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data() if callable(data) else data)
        return path

    return build


def _ours(**kwargs: Any) -> Callable[[Path], Path]:
    return _file(lambda: craft.ours(**kwargs))


def _config(**changes: Any) -> dict[str, Any]:
    return craft.config(**changes)


def _without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


# ---------------------------------------------------------------- vera-core files


def _control_cases() -> list[Case]:
    vectors = craft.vectors()
    A, B = vc.generate_projections(craft.SEED, craft.R, craft.MAX_IN, craft.MAX_OUT, xp=np)
    stored = {n: craft.entry(v) for n, v in vectors.items()} | {
        "projections.A": craft.entry(A),
        "projections.B": craft.entry(B),
    }
    dvora = {n: craft.entry(v) for n, v in vectors.items()}
    for name, (out, _, _) in craft.LAYERS.items():
        dvora[f"{name}.magnitude"] = craft.entry(np.linspace(0.5, 1.5, out, dtype=np.float32))
    big = craft.config(max_out=7)
    big["layers"]["fc1"]["out_features"] = 7
    big["projections_sha256"] = craft.projection_sha256(max_out=7)
    big_tensors = {n: craft.entry(v) for n, v in vectors.items()} | {"fc1.lambda_b": craft.entry(np.zeros(7, "f4"))}
    return [
        Case("valid", "ours", _ours(), None),
        Case(
            "valid-f16-vectors",
            "ours",
            _ours(tensors={n: craft.entry(v.astype("f2")) for n, v in vectors.items()}),
            None,
        ),
        Case("valid-bf16-vectors", "ours", _ours(tensors={n: craft.bf16_entry(v) for n, v in vectors.items()}), None),
        Case(
            "valid-f64-vectors",
            "ours",
            _ours(tensors={n: craft.entry(v.astype("f8")) for n, v in vectors.items()}),
            None,
        ),
        Case("valid-stored-projections", "ours", _ours(tensors=stored), None),
        Case("valid-without-payload-digest", "ours", _ours(digest=False), None),
        Case("valid-dvora", "ours", _ours(cfg=_config(method="dvora"), tensors=dvora), None, refused_by=("convert",)),
        Case("layer-does-not-fit-the-model", "ours", _ours(cfg=big, tensors=big_tensors), None, fits=False),
    ]


def _truncation_cases() -> list[Case]:
    data = craft.ours()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    points = {
        "empty": 0,
        "1-byte": 1,
        "7-bytes": 7,
        "length-only": 8,
        "9-bytes": 9,
        "mid-header": header // 2,
        "header-less-1": header - 1,
        "header-only": header,
        "header-plus-1": header + 1,
        "mid-data": (header + len(data)) // 2,
        "last-byte-missing": len(data) - 1,
    }
    return [
        Case(f"truncated-{name}", "ours", _file(data[:size]), NOT if size < header else AFE, exact=size <= 8)
        for name, size in points.items()
    ]


def bit_flip(data: bytes, position: int) -> bytes:
    """``data`` with bit ``position % 8`` of byte ``position`` flipped."""
    flipped = bytearray(data)
    flipped[position] ^= 1 << (position % 8)
    return bytes(flipped)


def _flip_cases() -> list[Case]:
    data = craft.ours()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    positions = [0, 3, 7, *np.linspace(8, header - 1, 14).astype(int).tolist()]
    positions += np.linspace(header, len(data) - 1, 8).astype(int).tolist()
    cases = []
    for position in sorted(set(positions)):
        in_data = position >= header
        expect = PAY if in_data else AFE
        cases.append(Case(f"bit-flip-{position:04d}", "ours", _file(bit_flip(data, position)), expect, exact=in_data))
    return cases


WRONG = {
    "int": [4.0, "4", True, None, [4], {"v": 4}],
    "bool": ["false", 0, 1, None, "true"],
    "float": ["abc", None, True, [0.1]],
    "str": [1, None, ["vera"], True],
}
"""Values of the wrong JSON type for each kind of field."""

FIELDS: dict[str, tuple[str, list[Any], list[Any]]] = {
    # field: (kind, bad values of the right type (negative, zero, out of range, ...), huge values)
    "r": ("int", [0, -1], [10**12, 2**64, 10**400]),
    "seed": ("int", [-1], [2**64, 10**30]),
    "max_in": ("int", [0, -5], [2**32, 10**12]),
    "max_out": ("int", [0, -5], [2**32, 10**12]),
    "method": ("str", ["VERA", "lora", ""], ["x" * 5000]),
    "d_initial": ("float", [], [1e400]),
    "dropout": ("float", [-0.1, 1.0, 1.5], [1e300]),
    "bias": ("str", ["some", "None"], []),
    "prng_id": ("str", [], ["x" * 5000]),
    "prng_version": ("int", [0, -1], [2**31, 10**20]),
    "projections_sha256": ("str", ["xyz", "G" * 64, "A" * 64, "0" * 63], []),
    "target_modules": ("str", [[1, 2], {"fc1": 1}], []),
    "bias_modules": ("str", [{"fc1": 3}, {"head": 0}, {"head": -1}, {"head": 2.0}, ["head"]], []),
    "layers": ("str", [[], {}, "fc1"], []),
    "extra": ("str", [{"unknown": 1}, {"detach_norm": "false"}, {"requested_r": 4.0}, {"framework": 3}], []),
}


def _with_field(field: str, value: Any) -> dict[str, Any]:
    cfg = craft.config()
    cfg[field] = value
    if field == "bias_modules" and isinstance(value, dict):
        cfg["bias"] = "all"
    return cfg


def _named(field: str, value: Any) -> str | None:
    """The field's name, which the message must hold, unless the value is not JSON at all (inf)."""
    return None if isinstance(value, float) and not np.isfinite(value) else field


def _valid_target_modules(value: Any) -> bool:
    return (
        value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    )


def _field_cases() -> list[Case]:
    cases = []
    for field, (kind, bad, huge) in FIELDS.items():
        values = [(f"type-{i}", v) for i, v in enumerate(WRONG[kind])] + [(f"bad-{i}", v) for i, v in enumerate(bad)]
        values += [(f"huge-{i}", v) for i, v in enumerate(huge)]
        for label, value in values:
            if (field == "target_modules" and _valid_target_modules(value)) or (field == "max_in" and value is None):
                continue  # valid values (a null max_in: the layers' widest input is given on load)
            keyword = next(iter(value)) if field == "extra" and isinstance(value, dict) else _named(field, value)
            cases.append(
                Case(f"config-{field}-{label}", "ours", _ours(cfg=_with_field(field, value)), AFE, keyword=keyword)
            )
        cases.append(
            Case(
                f"config-{field}-missing",
                "ours",
                _ours(cfg=_without(craft.config(), field)),
                AFE if field in ("r", "seed", "max_in", "max_out", "layers", "projections_sha256") else None,
                keyword=field if field in ("r", "seed", "max_in", "max_out", "layers") else None,
            )
        )
    cases.append(
        Case("config-unknown-field", "ours", _ours(cfg=_config(learning_rate=0.1)), AFE, keyword="learning_rate")
    )
    cases.append(Case("config-prng_version-2", "ours", _ours(cfg=_config(prng_version=2)), GEN))
    cases.append(Case("config-prng_id-unknown", "ours", _ours(cfg=_config(prng_id="my-rng")), GEN))
    cases.append(Case("config-seed-changed", "ours", _ours(cfg=_config(seed=craft.SEED + 1)), PROJ))
    cases.append(Case("config-r-changed", "ours", _ours(cfg=_config(r=craft.R + 1)), PROJ))
    cases.append(Case("config-checksum-wrong", "ours", _ours(cfg=_config(projections_sha256="0" * 64)), PROJ))
    return cases


def _layer_cases() -> list[Case]:
    cases = []
    layer_fields = {"out_features": "int", "rank": "int", "in_features": "int", "fan_in_fan_out": "bool"}
    for field, kind in layer_fields.items():
        bad = WRONG[kind] + ([0, -1, 2**32] if kind == "int" else [])
        for index, value in enumerate(bad):
            if field == "in_features" and value is None:
                continue  # null: unknown input size, valid
            cfg = craft.config()
            cfg["layers"]["fc2"][field] = value
            cases.append(Case(f"layer-{field}-{index}", "ours", _ours(cfg=cfg), AFE, keyword=field))
        cfg = craft.config()
        del cfg["layers"]["fc2"][field]
        required = field in ("out_features", "rank")
        cases.append(Case(f"layer-{field}-missing", "ours", _ours(cfg=cfg), AFE if required else None))
    cfg = craft.config()
    cfg["layers"]["fc2"]["stride"] = 2
    cases.append(Case("layer-unknown-field", "ours", _ours(cfg=cfg), AFE, keyword="stride"))
    cfg = craft.config()
    cfg["layers"]["fc2"] = [3, 2]
    cases.append(Case("layer-spec-is-a-list", "ours", _ours(cfg=cfg), AFE))
    cfg = craft.config()
    cfg["layers"]["fc2"]["rank"] = craft.R + 1
    cases.append(Case("layer-rank-above-r", "ours", _ours(cfg=cfg), AFE, keyword="rank"))
    cfg = craft.config()
    cfg["layers"]["fc2"]["in_features"] = craft.MAX_IN + 1
    cases.append(Case("layer-in-above-max_in", "ours", _ours(cfg=cfg), AFE, keyword="max_in"))
    return cases


def _metadata_cases() -> list[Case]:
    text = json.dumps(craft.config(), sort_keys=True)
    nested = json.dumps(craft.config())[:-1] + ', "extra2": ' + "[" * 100_000 + "]" * 100_000 + "}"
    cases = [
        ("format-missing", {"format": None}, NOT),
        ("format-other", {"format": "pt"}, NOT),
        ("format_version-abc", {"format_version": "abc"}, AFE),
        ("format_version-2", {"format_version": "2"}, AFE),
        ("format_version-0", {"format_version": "0"}, AFE),
        ("format_version-1.0", {"format_version": "1.0"}, AFE),
        ("format_version-missing", {"format_version": None}, AFE),
        ("config-missing", {"config": None}, AFE),
        ("unknown-key", {"comment": "hi"}, AFE),
        ("payload-not-hex", {"payload_sha256": "xyz"}, AFE),
        ("payload-zeros", {"payload_sha256": "0" * 64}, PAY),
    ]
    found = [Case(f"metadata-{name}", "ours", _ours(metadata=meta), expect) for name, meta, expect in cases]
    for name, raw in {
        "not-json": "not json {",
        "json-array": "[1, 2]",
        "json-string": '"config"',
        "duplicate-key": text[:-1] + ', "r": 5}',
        "nan-literal": text.replace('"d_initial": 0.1', '"d_initial": NaN'),
        "nested-too-deeply": nested,
        "empty": "",
    }.items():
        found.append(Case(f"config-text-{name}", "ours", _ours(cfg=raw), AFE))
    return found


def _header(entries: dict[str, Any], metadata: Any = None, tail: bytes = b"") -> bytes:
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + tail


def _container_cases() -> list[Case]:
    data = craft.ours()
    size = struct.unpack("<Q", data[:8])[0]
    good = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    meta = {"format": "vera-core", "format_version": "1", "config": json.dumps(craft.config())}
    raw = {
        "length-2**63": struct.pack("<Q", 2**63) + data[8:],
        "length-past-end": struct.pack("<Q", len(data)) + data[8:],
        "length-zero": struct.pack("<Q", 0) + data[8:],
        "length-short": struct.pack("<Q", size - 9) + data[8:],
        "header-not-utf8": struct.pack("<Q", 4) + b"\xff\xfe{}" + b"",
        "header-array": _header({}).replace(b"{}", b"[]"),
        "header-string": struct.pack("<Q", 4) + b'"ab"',
        "entry-missing-offsets": _header({"x": {"dtype": "F32", "shape": [2]}}, meta, b"\0" * 8),
        "entry-extra-field": _header({"x": {**good, "align": 8}}, meta, b"\0" * 8),
        "entry-dtype-unknown": _header({"x": {**good, "dtype": "F33"}}, meta, b"\0" * 8),
        "entry-shape-negative": _header({"x": {**good, "shape": [-2]}}, meta, b"\0" * 8),
        "entry-shape-float": _header({"x": {**good, "shape": [2.0]}}, meta, b"\0" * 8),
        "entry-shape-9-dims": _header({"x": {**good, "shape": [1] * 9}}, meta, b"\0" * 8),
        "entry-shape-huge": _header({"x": {**good, "shape": [2**62, 2**62]}}, meta, b"\0" * 8),
        "entry-offsets-reversed": _header({"x": {**good, "data_offsets": [8, 0]}}, meta, b"\0" * 8),
        "entry-offsets-past-end": _header({"x": {**good, "data_offsets": [0, 8]}}, meta, b"\0" * 4),
        "entry-offsets-float": _header({"x": {**good, "data_offsets": [0.0, 8.0]}}, meta, b"\0" * 8),
        "entries-overlap": _header({"x": good, "y": good}, meta, b"\0" * 8),
        "entries-gap": _header({"x": {**good, "data_offsets": [4, 12]}}, meta, b"\0" * 12),
        "trailing-bytes": _header({"x": good}, meta, b"\0" * 16),
        "metadata-list": _header({"x": good}, ["format"], b"\0" * 8),
        "metadata-value-int": _header({"x": good}, {**meta, "format_version": 1}, b"\0" * 8),
        "duplicate-tensor": _header({"x": good}, meta, b"\0" * 8).replace(b'"x":', b'"x": {}, "x":', 1),
    }
    cases = []
    for name, content in raw.items():
        if name == "duplicate-tensor":  # fix the length prefix after the textual edit
            body = content[8:]
            content = struct.pack("<Q", len(body)) + body
        expect = NOT if name in ("length-2**63", "length-past-end", "length-zero") else AFE
        cases.append(Case(f"container-{name}", "ours", _file(content), expect, exact=expect == NOT))
    return cases


def _tensor_cases() -> list[Case]:
    vectors = craft.vectors()

    def change(**replace: Any) -> dict[str, craft.Entry]:
        entries = {n: craft.entry(v) for n, v in vectors.items()}
        for name, value in replace.items():
            name = name.replace("__", ".")
            if value is None:
                del entries[name]
            else:
                entries[name] = value if isinstance(value, tuple) else craft.entry(value)
        return entries

    A, B = vc.generate_projections(craft.SEED, craft.R, craft.MAX_IN, craft.MAX_OUT, xp=np)
    cases = {
        "int32": (change(fc1__lambda_b=vectors["fc1.lambda_b"].astype("i4")), AFE),
        "bool": (change(fc1__lambda_b=vectors["fc1.lambda_b"] > 0), AFE),
        "int8": (change(fc1__lambda_d=vectors["fc1.lambda_d"].astype("i1")), AFE),
        "float8": (change(fc1__lambda_d=("F8_E4M3", (4,), b"\x38" * 4)), AFE),
        "uint16": (change(fc1__lambda_d=vectors["fc1.lambda_d"].astype("u2")), AFE),
        "nan": (change(fc1__lambda_b=np.where(np.arange(6) == 2, np.nan, vectors["fc1.lambda_b"]).astype("f4")), AFE),
        "inf": (change(fc2__lambda_d=np.array([np.inf, 1.0], "f4")), AFE),
        "lambda_b-too-long": (change(fc1__lambda_b=np.zeros(7, "f4")), AFE),
        "lambda_d-too-short": (change(fc1__lambda_d=np.zeros(3, "f4")), AFE),
        "lambda_b-2d": (change(fc1__lambda_b=np.zeros((6, 1), "f4")), AFE),
        "lambda_d-missing": (change(fc1__lambda_d=None), AFE),
        "extra-tensor": (change(fc3__lambda_d=np.zeros(2, "f4")), AFE),
        "scalar": (change(fc1__lambda_b=np.float32(1.0).reshape(())), AFE),
        "projection-A-only": (change(projections__A=A), AFE),
        "projections-wrong-shape": (change(projections__A=A[:, :-1], projections__B=B), AFE),
        "projections-modified": (change(projections__A=A * 1.5, projections__B=B), PROJ),
        "projections-int": (change(projections__A=A.astype("i4"), projections__B=B), AFE),
    }
    return [Case(f"tensor-{name}", "ours", _ours(tensors=entries), expect) for name, (entries, expect) in cases.items()]


def _budget_cases() -> list[Case]:
    def huge(**changes: Any) -> dict[str, Any]:
        cfg = craft.config(**changes)
        return cfg

    return [
        Case("budget-r-2**31", "ours", _ours(cfg=huge(r=2**31)), BIG),
        Case("budget-max_out-2**30", "ours", _ours(cfg=huge(max_out=2**30)), BIG),
        Case("budget-max_in-2**31", "ours", _ours(cfg=huge(max_in=2**31)), BIG),
        Case("budget-r-and-max_in", "ours", _ours(cfg=huge(r=2**16, max_in=2**16)), BIG),
    ]


def _pickle(protocol: int) -> bytes:
    return pickle.dumps({"fc1.lambda_d": [0.1] * 4}, protocol=protocol)


def _torch_save(zip_format: bool) -> bytes:
    import io

    from vera_core.generators import torch_available

    if not torch_available():  # a zip archive and a pickle stand in for .pt files
        return b"PK\x03\x04" + b"\0" * 60 if zip_format else _pickle(2)
    import torch

    buffer = io.BytesIO()
    torch.save({"fc1.lambda_d": torch.zeros(4)}, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


def _fifo(folder: Path) -> Path:
    path = folder / "pipe.safetensors"
    os.mkfifo(path)
    return path


def _link_loop(folder: Path) -> Path:
    path = folder / "loop.safetensors"
    os.symlink(path, path)
    return path


def _dangling(folder: Path) -> Path:
    path = folder / "dangling.safetensors"
    os.symlink(folder / "nowhere", path)
    return path


def _other_cases() -> list[Case]:
    weights = craft.container({"fc1.weight": craft.entry(np.zeros((2, 2), "f4"))})
    peft_weights = craft.container(craft.peft_tensors(), {"format": "pt"})
    return [
        Case("text-file", "other", _file(b"these are my notes\nnot an adapter\n" * 4, "notes.txt"), NOT),
        Case("json-file", "other", _file(json.dumps(craft.config()).encode(), "adapter.json"), NOT),
        Case("pickle-protocol-2", "other", _file(_pickle(2), "adapter.pkl"), NOT),
        Case("pickle-protocol-5", "other", _file(_pickle(5), "adapter.pkl"), NOT),
        Case("torch-save-zip", "other", _file(lambda: _torch_save(True), "adapter.pt"), NOT),
        Case("torch-save-legacy", "other", _file(lambda: _torch_save(False), "adapter.pt"), NOT),
        Case("random-bytes", "other", _file(np.random.default_rng(0).bytes(4096), "adapter.bin"), NOT),
        Case("zero-bytes-1k", "other", _file(b"\0" * 1024), NOT),
        Case("plain-safetensors", "other", _file(weights), NOT),
        Case("peft-weights-as-a-file", "other", _file(peft_weights), NOT),
        Case("fifo", "other", _fifo, NOT),
        Case("dev-zero", "other", lambda folder: Path("/dev/zero"), NOT),
        Case("missing-path", "other", lambda folder: folder / "missing.safetensors", NOT),
        Case("symlink-loop", "other", _link_loop, NOT),
        Case("dangling-symlink", "other", _dangling, NOT),
    ]


# ---------------------------------------------------------------- PEFT folders


def _peft(cfg: Any = None, tensors: Any = None, *, weights: bytes | None = None) -> Callable[[Path], Path]:
    return lambda folder: craft.peft_folder(folder / "peft", cfg, tensors, weights=weights)


def _peft_field(field: str, value: Any) -> dict[str, Any]:
    return craft.peft_config(**{field: value})


PEFT_FIELDS: dict[str, list[Any]] = {
    "r": [4.7, "4", True, 0, -1, None, 2**40, 4.0],
    "projection_prng_key": [0.5, -1, "0", 2**64, None, True],
    "fan_in_fan_out": ["false", 0, None],
    "save_projection": ["true", 1],
    "vera_dropout": [1.5, -0.1, "0", None],
    "d_initial": ["abc", None, 1e400],
    "bias": ["some", 1],
    "modules_to_save": [["lm_head"], "lm_head", [1]],
    "peft_type": ["LORA", 1, None, "vera"],
    "target_modules": [5, [1]],
    "inference_mode": ["yes", 1],
    "init_weights": [1, "true"],
    "layers_to_transform": ["1", [1.5], 1.5],
    "layers_pattern": [3, [3]],
    "base_model_name_or_path": [5, ["x"]],
    "auto_mapping": ["x", 3],
    "revision": [1],
    "task_type": [1],
    "peft_version": [0.21],
}


def _peft_cases() -> list[Case]:
    cases = [
        Case("peft-valid-stored", "peft", _peft(), None),
        Case(
            "peft-valid-not-stored",
            "peft",
            _peft(craft.peft_config(save_projection=False), craft.peft_tensors(stored=False)),
            None,
            needs_torch=True,
        ),
        Case(
            "peft-valid-bf16",
            "peft",
            _peft(
                tensors={
                    k: (craft.bf16_entry(np.frombuffer(v[2], "<f4").reshape(v[1])) if "lambda" in k else v)
                    for k, v in craft.peft_tensors().items()
                }
            ),
            None,
        ),
        Case("peft-valid-with-digest", "peft", _peft(weights=craft.peft_weights_with_digest()), None),
    ]
    for field, values in PEFT_FIELDS.items():
        for index, value in enumerate(values):
            case = Case(
                f"peft-config-{field}-{index}",
                "peft",
                _peft(_peft_field(field, value)),
                AFE,
                keyword=_named(field, value),
            )
            cases.append(case)
    for field in ("r", "peft_type"):
        cfg = _without(craft.peft_config(), field)
        cases.append(Case(f"peft-config-{field}-missing", "peft", _peft(cfg), AFE, keyword=field))
    cases += [
        Case("peft-config-unknown-field", "peft", _peft(craft.peft_config(lora_alpha=8)), AFE, keyword="lora_alpha"),
        Case("peft-config-not-json", "peft", _peft("{not json"), AFE),
        Case("peft-config-array", "peft", _peft("[1, 2]"), AFE),
        Case("peft-config-empty", "peft", _peft(""), AFE),
        Case("peft-config-duplicate-key", "peft", _peft(json.dumps(craft.peft_config())[:-1] + ', "r": 8}'), AFE),
        Case(
            "peft-config-nan",
            "peft",
            _peft(json.dumps(craft.peft_config()).replace('"d_initial": 0.1', '"d_initial": NaN')),
            AFE,
        ),
        Case("peft-config-huge-file", "peft", _peft(json.dumps(craft.peft_config()) + " " * (2 << 20)), BIG),
    ]

    def folder_with(build: Callable[[Path], None]) -> Callable[[Path], Path]:
        def make(folder: Path) -> Path:
            path = craft.peft_folder(folder / "peft")
            build(path)
            return path

        return make

    cases += [
        Case("peft-no-config", "peft", folder_with(lambda p: (p / "adapter_config.json").unlink()), NOT),
        Case("peft-no-weights", "peft", folder_with(lambda p: (p / "adapter_model.safetensors").unlink()), NOT),
        Case(
            "peft-pickle-weights-only",
            "peft",
            folder_with(lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin")),
            NOT,
        ),
        Case(
            "peft-config-is-a-folder",
            "peft",
            folder_with(lambda p: ((p / "adapter_config.json").unlink(), (p / "adapter_config.json").mkdir())),
            NOT,
        ),
        Case(
            "peft-config-is-a-fifo",
            "peft",
            folder_with(lambda p: ((p / "adapter_config.json").unlink(), os.mkfifo(p / "adapter_config.json"))),
            NOT,
        ),
        Case(
            "peft-weights-is-a-fifo",
            "peft",
            folder_with(
                lambda p: ((p / "adapter_model.safetensors").unlink(), os.mkfifo(p / "adapter_model.safetensors"))
            ),
            NOT,
        ),
        Case("peft-weights-empty", "peft", _peft(weights=b""), NOT),
        Case("peft-weights-text", "peft", _peft(weights=b"not a tensor file at all, just text\n" * 3), NOT),
        Case("empty-folder", "peft", lambda folder: (folder / "empty").mkdir() or folder / "empty", NOT),
        Case(
            "folder-named-safetensors",
            "peft",
            lambda folder: (folder / "a.safetensors").mkdir() or folder / "a.safetensors",
            NOT,
        ),
    ]
    digest_weights = craft.peft_weights_with_digest()
    header = 8 + struct.unpack("<Q", digest_weights[:8])[0]
    for position in np.linspace(header, len(digest_weights) - 1, 4).astype(int).tolist():
        flipped = bit_flip(digest_weights, position)
        cases.append(Case(f"peft-bit-flip-{position:04d}", "peft", _peft(weights=flipped), PAY))
    for size in (4, header - 3, len(digest_weights) - 5):
        cases.append(Case(f"peft-truncated-{size}", "peft", _peft(weights=digest_weights[:size]), AFE, exact=False))

    def tensors(**replace: Any) -> dict[str, craft.Entry]:
        found = craft.peft_tensors()
        for key, value in replace.items():
            key = key.replace("__", ".")
            if value is None:
                del found[key]
            else:
                found[key] = value if isinstance(value, tuple) else craft.entry(value)
        return found

    p = "base_model__model__"
    A, _ = vc.generate_projections(craft.SEED, craft.R, craft.MAX_IN, craft.MAX_OUT, xp=np)
    weight_cases = {
        "vera_A-without-vera_B": (tensors(base_model__vera_B=None), None),
        "vera_B-without-vera_A": (tensors(base_model__vera_A=None), None),
        "vera_A-1d": (tensors(base_model__vera_A=A.reshape(-1)), None),
        "vera_A-wrong-rank": (tensors(base_model__vera_A=np.zeros((craft.R + 1, craft.MAX_IN), "f4")), None),
        "lambda_d-short": (tensors(**{f"{p}fc1__vera_lambda_d": np.zeros(craft.R - 1, "f4")}), None),
        "lambda_b-2d": (tensors(**{f"{p}fc1__vera_lambda_b": np.zeros((6, 1), "f4")}), None),
        "lambda_b-empty": (tensors(**{f"{p}fc1__vera_lambda_b": np.zeros(0, "f4")}), None),
        "lambda_b-missing": (tensors(**{f"{p}fc1__vera_lambda_b": None}), None),
        "lambda_d-missing": (tensors(**{f"{p}fc1__vera_lambda_d": None}), None),
        "unknown-key": (tensors(**{f"{p}fc1__lora_A": np.zeros(2, "f4")}), None),
        "int32-lambda": (tensors(**{f"{p}fc1__vera_lambda_b": np.zeros(6, "i4")}), None),
        "nan-lambda": (tensors(**{f"{p}fc1__vera_lambda_b": np.full(6, np.nan, "f4")}), None),
        "bias-with-bias-none": (tensors(**{f"{p}fc1__base_layer__bias": np.zeros(6, "f4")}), None),
        "adapted-bias-of-other-layer": (
            tensors(**{f"{p}head__base_layer__bias": np.zeros(3, "f4")}),
            craft.peft_config(bias="all"),
        ),
        "two-keys-one-bias": (
            tensors(**{f"{p}fc1__base_layer__bias": np.zeros(6, "f4"), f"{p}fc1__bias": np.zeros(6, "f4")}),
            craft.peft_config(bias="all"),
        ),
        "stored-but-save_projection-false": (tensors(), craft.peft_config(save_projection=False)),
        "not-stored-but-save_projection-true": (craft.peft_tensors(stored=False), None),
    }
    for name, (entries, cfg) in weight_cases.items():
        cases.append(Case(f"peft-weights-{name}", "peft", _peft(cfg, entries), AFE))
    wide = craft.peft_tensors()
    wide[f"{craft.PEFT_PREFIX}fc1.vera_lambda_b"] = craft.entry(np.zeros(7, "f4"))
    bare = {k: v for k, v in wide.items() if "vera_A" not in k and "vera_B" not in k}
    cfg = craft.peft_config(save_projection=False)
    cases.append(
        Case("peft-layer-does-not-fit-the-model", "peft", _peft(cfg, bare), None, fits=False, needs_torch=True)
    )
    return cases


def cases() -> list[Case]:
    """The whole corpus (names are unique)."""
    found = (
        _control_cases()
        + _truncation_cases()
        + _flip_cases()
        + _field_cases()
        + _layer_cases()
        + _metadata_cases()
        + _container_cases()
        + _tensor_cases()
        + _budget_cases()
        + _other_cases()
        + _peft_cases()
    )
    names = [case.name for case in found]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    return found


def build_all(root: Path, *, torch: bool) -> dict[str, dict[str, Any]]:
    """Build every case under ``root``; the manifest: name -> path, kind, expectations."""
    manifest = {}
    for case in cases():
        folder = root / case.name
        folder.mkdir(parents=True)
        path = case.build(folder)
        manifest[case.name] = {
            "path": str(path),
            "kind": case.kind,
            "expected": {loader: case.expected(loader, torch=torch) for loader in LOADERS},
            "exact": case.exact,
            "keyword": case.keyword,
        }
    return manifest
