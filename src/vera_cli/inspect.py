"""``vera inspect``: describe an adapter file or PEFT folder and check its projections."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import numpy as np

from vera_cli.common import CliError, add_max_bytes, budget
from vera_core.errors import ProjectionMismatchError, UnknownGeneratorError
from vera_core.generators import PEFT_PRNG_ID, peft_projections, torch_available
from vera_core.loading import FORMAT_OURS, VerifiedAdapter, read_adapter
from vera_core.projections import PRNG_ID, PRNG_VERSION, generate_projections


@dataclasses.dataclass
class ProjectionCheck:
    """Whether the projections an adapter stores (or its checksum records) match its seed."""

    stored: bool
    verified: bool | None
    """True: they match; False: they do not; None: could not be checked."""
    detail: str


def _same(stored: tuple[np.ndarray, np.ndarray], generated: tuple[np.ndarray, np.ndarray]) -> bool:
    return all(np.array_equal(s.astype(g.dtype), g) for s, g in zip(stored, generated, strict=True))


def _check_regenerated(adapter: VerifiedAdapter) -> ProjectionCheck:
    if adapter.config.projections_sha256 is None:  # PEFT folders record none
        return ProjectionCheck(False, None, "not stored and no checksum recorded: regenerated from the seed on load")
    try:
        adapter.projections()
    except ProjectionMismatchError:
        return ProjectionCheck(False, False, "not stored; regenerated, their checksum does NOT match the recorded one")
    except UnknownGeneratorError as error:
        return ProjectionCheck(False, None, f"cannot verify: {error}")
    return ProjectionCheck(False, True, "not stored; regenerated, their checksum matches the recorded one")


def check_projections(adapter: VerifiedAdapter) -> ProjectionCheck:
    """Compare the adapter's projections with what its seed and generator give.

    Stored matrices (whose checksum :func:`~vera_core.loading.read_adapter` already
    verified) are compared element for element with the regenerated ones; otherwise the
    recorded ``projections_sha256`` is compared with the regenerated matrices' through
    :meth:`~vera_core.loading.VerifiedAdapter.projections`. A PEFT folder may store
    vera-core's Threefry matrices (``vera convert`` writes such folders): those are
    recognised too. PEFT's own generator needs PyTorch; without it the result may be
    "cannot verify".
    """
    config, stored = adapter.config, adapter.stored
    if stored is None:
        return _check_regenerated(adapter)
    ours = (config.prng_id, config.prng_version) == (PRNG_ID, PRNG_VERSION)
    width = stored[0].shape[1]
    dtype = np.float64 if stored[0].dtype == np.float64 else np.float32
    threefry = generate_projections(config.seed, config.r, width, config.max_out, xp=np, dtype=dtype)
    if _same(stored, threefry):
        origin = "" if ours else " (written by vera-core; PEFT uses the stored matrices)"
        return ProjectionCheck(True, True, f"stored; they are {PRNG_ID} v{PRNG_VERSION}'s for the seed{origin}")
    if ours:
        return ProjectionCheck(True, False, f"stored; they do NOT match {PRNG_ID} v{PRNG_VERSION} for the seed")
    if config.prng_id != PEFT_PRNG_ID:
        return ProjectionCheck(True, None, f"stored; cannot verify: unknown generator {config.prng_id}")
    if not torch_available():
        return ProjectionCheck(True, None, "stored; cannot verify: torch not installed")
    same = _same(stored, peft_projections(config.seed, config.r, width, config.max_out))
    verdict = "they are" if same else "they do NOT match"
    return ProjectionCheck(True, same, f"stored; {verdict} PEFT's torch generator's for the seed")


def describe(adapter: VerifiedAdapter) -> dict[str, Any]:
    """Everything ``vera inspect`` reports, as JSON-able data."""
    config = adapter.config
    check = check_projections(adapter)
    layers = [
        {
            "name": name,
            "out_features": spec.out_features,
            "in_features": spec.in_features,
            "rank": spec.rank,
            "fan_in_fan_out": spec.fan_in_fan_out,
        }
        for name, spec in config.layers.items()
    ]
    return {
        "path": str(adapter.path),
        "format": adapter.format,
        "method": config.method,
        "r": config.r,
        "seed": config.seed,
        "prng_id": config.prng_id,
        "prng_version": config.prng_version,
        "max_in": config.max_in,
        "max_out": config.max_out,
        "d_initial": config.d_initial,
        "dropout": config.dropout,
        "bias": config.bias,
        "trainable_parameters": adapter.trainable_parameters,
        "bytes": adapter.file_bytes,
        "layers": layers,
        "projections": dataclasses.asdict(check),
    }


def render(report: dict[str, Any]) -> str:
    """The human-readable form of :func:`describe`'s report."""
    kind = "vera-core adapter file" if report["format"] == FORMAT_OURS else "PEFT VeRA folder"
    proj = report["projections"]
    status = {True: "OK", False: "MISMATCH", None: "unchecked"}[proj["verified"]]
    rows = [
        ("method", report["method"]),
        ("rank r", report["r"]),
        ("seed", report["seed"]),
        ("generator", f"{report['prng_id']} v{report['prng_version']}"),
        ("max_in / max_out", f"{report['max_in'] if report['max_in'] is not None else '?'} / {report['max_out']}"),
        ("d_initial", report["d_initial"]),
        ("dropout", report["dropout"]),
        ("bias", report["bias"]),
        ("trainable", f"{report['trainable_parameters']:,} parameters in {len(report['layers'])} layers"),
        ("projections", f"[{status}] {proj['detail']}"),
    ]
    lines = [f"{report['path']}  ({kind}, {report['bytes']:,} bytes)"]
    lines += [f"  {key:<17} {value}" for key, value in rows]
    table = [("layer", "out", "in", "rank", "layout")] + [
        (
            layer["name"],
            str(layer["out_features"]),
            "?" if layer["in_features"] is None else str(layer["in_features"]),
            str(layer["rank"]),
            "(in, out)" if layer["fan_in_fan_out"] else "(out, in)",
        )
        for layer in report["layers"]
    ]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines.append("  layers")
    lines += ["    " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the report; exit status 1 when the projections do not match the seed."""
    report = describe(read_adapter(args.path, max_bytes=budget(args)))
    print(json.dumps(report, indent=2) if args.json else render(report))
    if report["projections"]["verified"] is False:
        raise CliError(f"{args.path}: {report['projections']['detail']}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``vera inspect``."""
    parser = subparsers.add_parser(
        "inspect",
        help="describe an adapter file or PEFT folder",
        description="Describe a vera-core adapter file or a PEFT VeRA folder: rank, seed, generator, layers, "
        "parameter count, and whether the stored projections (or their checksum) match the seed.",
    )
    parser.add_argument("path", metavar="FILE|DIR", help="a vera-core .safetensors file or a PEFT adapter folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_max_bytes(parser)
    parser.set_defaults(run=run)
