"""What the ``vera`` subcommands share: the one-line error type and the ``--max-bytes`` option."""

from __future__ import annotations

import argparse

from vera_core.loading import DEFAULT_MAX_BYTES, MAX_BYTES_ENV, byte_budget, parse_byte_size


class CliError(Exception):
    """A problem with the user's files or arguments, reported in one line with exit status 1."""


def _byte_size(text: str) -> int:
    try:
        return parse_byte_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_max_bytes(parser: argparse.ArgumentParser) -> None:
    """Register ``--max-bytes`` (the loader's byte budget) on a subcommand."""
    parser.add_argument(
        "--max-bytes",
        type=_byte_size,
        metavar="SIZE",
        help=f"refuse adapters whose loading would allocate more (default ${MAX_BYTES_ENV} or "
        f"{DEFAULT_MAX_BYTES // 2**30} GiB; units K, M, G, T)",
    )


def budget(args: argparse.Namespace) -> int:
    """The byte budget for this command: ``--max-bytes``, else the environment, else the default."""
    try:
        return byte_budget(args.max_bytes)
    except ValueError as error:
        raise CliError(str(error)) from None
