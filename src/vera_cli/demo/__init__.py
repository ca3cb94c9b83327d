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

METHOD_NAMES = ("full", "lora", "vera", "dvora")
BACKENDS = ("numpy", "torch", "cupy")


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


def run(args: argparse.Namespace) -> int:
    """Run the demo (imports the training stack only now)."""
    from vera_cli.demo.runner import run_demo

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
        default=list(METHOD_NAMES),
        metavar="LIST",
        help="comma-separated subset of full,lora,vera,dvora (default all)",
    )
    parser.add_argument(
        "--out", default="vera-demo-output", metavar="DIR", help="output folder (default ./vera-demo-output)"
    )
    parser.add_argument("--epochs", type=_positive, default=30, help="adaptation epochs per method (default 30)")
    parser.add_argument("--pretrain-epochs", type=_positive, default=30, help="pretraining epochs (default 30)")
    parser.add_argument("--hidden", type=_positive, default=128, help="hidden width of the MLP (default 128)")
    parser.add_argument("--rank", type=_positive, default=128, help="VeRA/DVoRA rank r (default 128)")
    parser.add_argument("--lora-rank", type=_positive, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--batch-size", type=_positive, default=32, help="batch size (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data split, initialisation, projections")
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds; for tests)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(run=run)
