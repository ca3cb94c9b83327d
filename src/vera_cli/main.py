"""The ``vera`` entry point: argument parsing and error reporting.

Exit status: 0 on success, 2 for usage errors (argparse), 1 for bad files or failed
operations, reported in one line on stderr without a traceback. Every bad input has its
own message (:class:`~vera_cli.common.CliError`, :class:`~vera_core.errors.AdapterFileError`,
``OSError``); anything else would be a bug in vera-core, and is still reported in one line
(saying so) rather than as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from vera_cli import convert, demo, inspect, merge
from vera_cli.common import CliError
from vera_core import __version__
from vera_core.errors import AdapterFileError


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="vera",
        description="VeRA and DVoRA adapters: a demo, and tools for adapter files and PEFT folders.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (demo, inspect, merge, convert):
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``vera`` command and return its exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name; default ``sys.argv[1:]``.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except BrokenPipeError:  # the reader went away (``vera inspect ... | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"vera {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CliError, AdapterFileError, OSError) as error:
        print(f"vera {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:  # a bug, not a bad input: still no traceback
        print(
            f"vera {args.command}: internal error ({type(error).__name__}: {one_line(error)}); please report it",
            file=sys.stderr,
        )
        return 1


def one_line(error: BaseException) -> str:
    """The error's message on one line (line breaks become "; ").

    Examples
    --------
    >>> one_line(ValueError("two problems:\\n  a\\n  b"))
    'two problems:; a; b'
    """
    return "; ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__
