"""``vera convert``: between vera-core adapter files and PEFT VeRA folders.

The output's form follows its name: ``OUT.safetensors`` is a vera-core file, any other
name a PEFT folder (``--to`` may say the same, never the opposite). vera-core -> PEFT
stores the projections in the folder (PEFT cannot regenerate vera-core's Threefry
stream; it reads stored ones since 0.21). PEFT -> vera-core keeps stored projections,
unless they are exactly vera-core's stream for the adapter's seed (a folder this command
wrote), in which case the file stores the seed and a checksum only. A PEFT folder
without stored projections is regenerated with PEFT's ``torch.Generator`` recipe, which
needs PyTorch and ``--max-in``. Both inputs are read and verified by
:func:`vera_core.loading.read_adapter`; both outputs are written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from vera_cli.common import CliError, add_max_bytes, budget
from vera_core.adapter_file import PROJECTION_KEYS, projection_checksum, save_adapter_file
from vera_core.loading import FORMAT_OURS, FORMAT_PEFT, VerifiedAdapter, read_adapter
from vera_core.peft_format import write_peft_folder
from vera_core.projections import PRNG_ID, PRNG_VERSION, generate_projections

SUFFIX = ".safetensors"


def to_peft(adapter: VerifiedAdapter, output: Path) -> None:
    """Write ``adapter`` (vera-core, VeRA only) as a PEFT folder with stored projections, as one unit."""
    if adapter.config.method != "vera":
        raise CliError(f"PEFT has no {adapter.config.method.upper()}: only VeRA adapters convert to PEFT")
    A, B = adapter.projections()
    write_peft_folder(output, adapter.config, adapter.vectors, A, B)


def from_peft(adapter: VerifiedAdapter, output: Path, max_in: int | None) -> None:
    """Write the PEFT ``adapter`` as a vera-core file (atomically)."""
    config = adapter.config
    if config.max_in is None and max_in is None:
        raise CliError(f"{adapter.path} stores no projections and does not record max_in: give --max-in")
    A, B = adapter.projections(max_in=max_in)
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


def target_format(output: str, requested: str | None) -> str:
    """``"vera"`` for a ``.safetensors`` name, else ``"peft"``; CliError when ``--to`` says otherwise.

    Examples
    --------
    >>> target_format("out.safetensors", None), target_format("out-folder", "peft")
    ('vera', 'peft')
    """
    implied = "vera" if output.lower().endswith(SUFFIX) else "peft"
    if requested is not None and requested != implied:
        if requested == "peft":
            raise CliError(f"--to peft writes a folder, but {output} ends in {SUFFIX}; name the folder without it")
        raise CliError(f"--to vera writes a {SUFFIX} file, but {output} does not end in {SUFFIX}")
    return implied


def run(args: argparse.Namespace) -> int:
    """Convert to the format the output's name implies."""
    target = target_format(args.output, args.to)
    adapter = read_adapter(args.input, max_bytes=budget(args))
    output = Path(args.output)
    if target == "peft":
        if adapter.format == FORMAT_PEFT:
            raise CliError(f"{args.input} is already a PEFT folder; to make a vera-core file, name OUT *{SUFFIX}")
        to_peft(adapter, output)
    else:
        if adapter.format == FORMAT_OURS:
            raise CliError(
                f"{args.input} is already a vera-core adapter file; to make a PEFT folder, name OUT without {SUFFIX}"
            )
        from_peft(adapter, output, args.max_in)
    print(f"wrote {output} ({'PEFT VeRA folder' if target == 'peft' else 'vera-core adapter file'})")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_parser(subparsers: Any) -> None:
    """Register ``vera convert``."""
    parser = subparsers.add_parser(
        "convert",
        help="convert between vera-core files and PEFT folders",
        description="Convert a vera-core adapter file to a PEFT VeRA folder (projections stored), or a PEFT "
        f"VeRA folder to a vera-core adapter file. OUT ending in {SUFFIX} is a vera-core file; any other name "
        "is a PEFT folder.",
    )
    parser.add_argument("input", metavar="IN", help="a vera-core .safetensors file or a PEFT adapter folder")
    parser.add_argument("output", metavar="OUT", help="the .safetensors file or PEFT folder to write")
    parser.add_argument("--to", choices=("peft", "vera"), help="output format (must agree with OUT's name)")
    parser.add_argument(
        "--max-in",
        type=_positive,
        metavar="N",
        help="largest input features of the adapted layers, for PEFT folders that store no projections",
    )
    add_max_bytes(parser)
    parser.set_defaults(run=run)
