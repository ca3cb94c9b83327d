"""``vera convert``: between vera-core adapter files and PEFT VeRA folders.

vera-core -> PEFT stores the projections in the folder (PEFT cannot regenerate
vera-core's Threefry stream; it reads stored ones since 0.21). PEFT -> vera-core keeps
stored projections, unless they are exactly vera-core's stream for the adapter's seed
(a folder this command wrote), in which case the file stores the seed and a checksum
only. A PEFT folder without stored projections is regenerated with PEFT's
``torch.Generator`` recipe, which needs PyTorch and ``--max-in``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vera_cli.adapters import FORMAT_OURS, FORMAT_PEFT, CliError, LoadedAdapter, load_adapter, projections
from vera_core.adapter_file import PROJECTION_KEYS, projection_checksum, save_adapter_file
from vera_core.peft_format import CONFIG_NAME, WEIGHTS_NAME, write_peft_folder
from vera_core.projections import PRNG_ID, PRNG_VERSION, generate_projections


def to_peft(adapter: LoadedAdapter, output: Path) -> None:
    """Write ``adapter`` (vera-core, VeRA only) as a PEFT folder with stored projections.

    The folder is assembled beside ``output`` and moved into place, so a failure leaves
    no partial folder; an existing PEFT folder has its two files replaced atomically.
    """
    if adapter.config.method != "vera":
        raise CliError(f"PEFT has no {adapter.config.method.upper()}: only VeRA adapters convert to PEFT")
    if output.exists() and not output.is_dir():
        raise CliError(f"{output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / CONFIG_NAME).is_file():
        raise CliError(f"{output} is a folder with other files in it; choose an empty or new folder")
    A, B = projections(adapter)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    try:
        write_peft_folder(staging, adapter.config, adapter.vectors, A, B)
        if output.is_dir():
            for name in (WEIGHTS_NAME, CONFIG_NAME):  # weights first, as write_peft_folder does
                os.replace(staging / name, output / name)
        else:
            os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def from_peft(adapter: LoadedAdapter, output: Path, max_in: int | None) -> None:
    """Write the PEFT ``adapter`` as a vera-core file (atomically)."""
    config = adapter.config
    A, B = projections(adapter, max_in=max_in)
    width = int(A.shape[1])
    ours_A, ours_B = generate_projections(config.seed, config.r, width, config.max_out, xp=np)
    tensors = dict(adapter.vectors)
    if np.array_equal(A, ours_A) and np.array_equal(B, ours_B):
        prng_id, prng_version = PRNG_ID, PRNG_VERSION
    else:
        prng_id, prng_version = config.prng_id, config.prng_version
        tensors[PROJECTION_KEYS[0]], tensors[PROJECTION_KEYS[1]] = A, B
    new = dataclasses.replace(
        config,
        max_in=width,
        prng_id=prng_id,
        prng_version=prng_version,
        projections_sha256=projection_checksum(A, B),
    )
    save_adapter_file(output, new, tensors)


def run(args: argparse.Namespace) -> int:
    """Convert in the direction ``--to`` names (by default, the other format)."""
    adapter = load_adapter(args.input)
    target = args.to or ("peft" if adapter.format == FORMAT_OURS else "vera")
    output = Path(args.output)
    if target == "peft":
        if adapter.format == FORMAT_PEFT:
            raise CliError(f"{args.input} is already a PEFT folder")
        to_peft(adapter, output)
    else:
        if adapter.format == FORMAT_OURS:
            raise CliError(f"{args.input} is already a vera-core adapter file")
        from_peft(adapter, output, args.max_in)
    print(f"wrote {output} ({'PEFT VeRA folder' if target == 'peft' else 'vera-core adapter file'})")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_parser(subparsers: Any) -> None:
    """Register ``vera convert``."""
    parser = subparsers.add_parser(
        "convert",
        help="convert between vera-core files and PEFT folders",
        description="Convert a vera-core adapter file to a PEFT VeRA folder (projections stored), or a PEFT "
        "VeRA folder to a vera-core adapter file.",
    )
    parser.add_argument("input", metavar="IN", help="a vera-core .safetensors file or a PEFT adapter folder")
    parser.add_argument("output", metavar="OUT", help="the PEFT folder or .safetensors file to write")
    parser.add_argument("--to", choices=("peft", "vera"), help="output format (default: the other one)")
    parser.add_argument(
        "--max-in",
        type=_positive,
        metavar="N",
        help="largest input features of the adapted layers, for PEFT folders that store no projections",
    )
    parser.set_defaults(run=run)
