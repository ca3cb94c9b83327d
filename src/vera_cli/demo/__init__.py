"""``vera demo``: pretrain a small network on scikit-learn's digits, adapt it four ways, compare.

The modules: :mod:`~vera_cli.demo.data` (the tasks), :mod:`~vera_cli.demo.models` (the
MLP), :mod:`~vera_cli.demo.lora` (a baseline LoRA layer), :mod:`~vera_cli.demo.methods`
(full fine-tuning, LoRA, VeRA, DVoRA), :mod:`~vera_cli.demo.train`,
:mod:`~vera_cli.demo.report`, :mod:`~vera_cli.demo.plot` and
:mod:`~vera_cli.demo.runner`. Heavy imports (scikit-learn, matplotlib, tqdm) happen
only when the demo runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from vera_cli.common import CliError

METHOD_NAMES = ("full", "lora", "vera", "dvora")
BACKENDS = ("numpy", "torch", "cupy")
DEFAULT_TENANTS = 1000


def _methods(text: str) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in METHOD_NAMES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {','.join(METHOD_NAMES)}; got {text!r}")
    return list(dict.fromkeys(chosen))


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


CLASSIC_DEFAULTS = {"hidden": 128, "rank": 128, "epochs": 30, "batch_size": 32}
"""The four-methods demo's sizes (``--tenants`` picks its own when they are not given)."""


def run(args: argparse.Namespace) -> int:
    """Run the demo (imports the training stack only now)."""
    if args.tenants is not None:
        if args.methods is not None:
            raise CliError("--tenants trains one VeRA adapter per user; --methods does not apply to it")
        from vera_cli.demo.tenants import run_tenants

        return run_tenants(args)
    from vera_cli.demo.runner import run_demo

    for name, value in CLASSIC_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.methods is None:
        args.methods = list(METHOD_NAMES)
    return run_demo(args)


def add_parser(subparsers: Any) -> None:
    """Register ``vera demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="pretrain a small network, adapt it four ways, compare",
        description="Pretrain an MLP on scikit-learn's handwritten digits (no download), then adapt it to the "
        "same digits rotated by 90 degrees by full fine-tuning, LoRA, VeRA and DVoRA. Prints a table of "
        "trainable parameters, file sizes, accuracy before and after, and time; writes it with a plot "
        "and the trained adapters into --out.",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="numpy", help="array backend (default numpy)")
    parser.add_argument(
        "--methods",
        type=_methods,
        default=None,
        metavar="LIST",
        help="comma-separated subset of full,lora,vera,dvora (default all)",
    )
    parser.add_argument(
        "--tenants",
        type=_positive,
        nargs="?",
        const=DEFAULT_TENANTS,
        default=None,
        metavar="N",
        help=f"the many-users story instead: N users (default {DEFAULT_TENANTS:,}), each with its own rotation of the "
        "digits and its own VeRA adapter, all trained in one batched run over an adapter bank; reports per-user "
        "accuracy, storage against LoRA and model copies, and mixed-batch serving",
    )
    parser.add_argument(
        "--out", default="vera-demo-output", metavar="DIR", help="output folder (default ./vera-demo-output)"
    )
    parser.add_argument(
        "--epochs", type=_positive, default=None, help="adaptation epochs per method (default 30; 10 with --tenants)"
    )
    parser.add_argument("--pretrain-epochs", type=_positive, default=30, help="pretraining epochs (default 30)")
    parser.add_argument(
        "--hidden", type=_positive, default=None, help="hidden width of the MLP (default 128; 64 with --tenants)"
    )
    parser.add_argument(
        "--rank", type=_positive, default=None, help="VeRA/DVoRA rank r (default 128; 64 with --tenants)"
    )
    parser.add_argument("--lora-rank", type=_positive, default=4, help="LoRA rank (default 4)")
    parser.add_argument(
        "--batch-size",
        type=_positive,
        default=None,
        help="batch size (default 32); with --tenants, images of each user per step (default 8)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data split, initialisation, projections")
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds; for tests)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(run=run)
