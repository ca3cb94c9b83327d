"""``vera demo``: pretrain on digits, adapt to rotated digits four ways, report and plot."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vera_cli.common import CliError
from vera_cli.demo import data, methods, models, report
from vera_cli.demo.plot import plot
from vera_cli.demo.train import evaluate, fit


@dataclasses.dataclass(frozen=True)
class Engine:
    """How the demo builds, trains and evaluates on one backend, and moves arrays there."""

    build: Callable[..., methods.Setup]
    fit: Callable[..., float]
    evaluate: Callable[[Any, Any, Any], float]
    from_host: Callable[[np.ndarray], Any]
    to_host: Callable[[Any], np.ndarray]


def engine(name: str) -> Engine:
    """The engine for ``--backend``; CliError when it cannot run here."""
    if name != "torch":
        require({"vera_numpy": "vera-core[numpy]"})
    if name == "numpy":
        return Engine(methods.build, fit, evaluate, np.asarray, np.asarray)
    if name == "cupy":
        try:
            import cupy

            from vera_cupy import CupyBackend
        except ImportError as error:
            raise CliError("--backend cupy needs CuPy and a CUDA GPU; CuPy is not installed") from error
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError:
            count = 0
        if count == 0:
            raise CliError("--backend cupy needs a CUDA GPU and this machine has none")
        backend = CupyBackend()
        return Engine(methods.build, fit, evaluate, backend.from_host, backend.to_host)
    try:
        import torch

        from vera_cli.demo import torch_engine
    except ImportError as error:
        raise CliError(f"--backend torch needs PyTorch and vera_torch: {error}") from error
    return Engine(
        torch_engine.build,
        torch_engine.fit,
        torch_engine.evaluate,
        torch.as_tensor,
        lambda tensor: tensor.detach().cpu().numpy(),
    )


def _bar(total: int, label: str, enabled: bool) -> Any:
    """A progress bar on stderr, drawn only when stderr is a terminal (piped or redirected output stays clean)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=f"{label:<18}",
        unit="step",
        disable=not (enabled and sys.stderr.isatty()),
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
    )


def _steps(n: int, batch_size: int, epochs: int) -> int:
    return epochs * max(1, -(-n // batch_size))


def require(modules: dict[str, str]) -> None:
    """CliError naming the pip packages of every module in ``modules`` that is not installed."""
    missing = [package for module, package in modules.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise CliError(f"the demo needs {', '.join(missing)}: pip install {' '.join(missing)}")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The run's sizes, from the arguments (``--quick`` shrinks them)."""

    hidden: int
    pretrain_epochs: int
    epochs: int
    limit: int | None

    @classmethod
    def of(cls, args: argparse.Namespace) -> Sizes:
        if args.quick:
            return cls(hidden=32, pretrain_epochs=8, epochs=10, limit=1000)
        return cls(args.hidden, args.pretrain_epochs, args.epochs, None)


def _train(
    run: Engine, setup: methods.Setup, split: tuple[Any, ...], epochs: int, label: str, args: argparse.Namespace
) -> None:
    x, y = split[0], split[1]
    with _bar(_steps(int(x.shape[0]), args.batch_size, epochs), label, args.progress) as bar:
        run.fit(
            setup.net,
            setup.params,
            x,
            y,
            epochs=epochs,
            lr=setup.lr,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=bar,
        )


def _adapt(
    run: Engine,
    method: str,
    weights: dict[str, Any],
    settings: methods.Settings,
    split: tuple[Any, ...],
    epochs: int,
    out: Path,
    args: argparse.Namespace,
) -> report.Result:
    """Adapt the pretrained weights with one method; save what it trained and measure it."""
    label = settings.label(method)
    setup = run.build(method, weights, settings, run.to_host)
    before = run.evaluate(setup.net, split[2], split[3])
    tick = time.perf_counter()
    _train(run, setup, split, epochs, label, args)
    after = run.evaluate(setup.net, split[2], split[3])
    seconds = time.perf_counter() - tick
    path = out / setup.file_name
    setup.save(path)
    return report.Result(
        method, label, models.parameter_count(setup.params), path.name, path.stat().st_size, before, after, seconds
    )


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo with the parsed arguments; write everything into ``args.out``."""
    started = time.perf_counter()
    require({"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm", "safetensors": "safetensors"})
    run = engine(args.backend)
    sizes = Sizes.of(args)
    settings = methods.Settings(vera_rank=min(args.rank, sizes.hidden), lora_rank=args.lora_rank, seed=args.seed)
    tasks = data.load_tasks(args.seed, limit=sizes.limit)
    pretrain = tuple(run.from_host(a) for a in dataclasses.astuple(tasks.pretrain))
    adapt = tuple(run.from_host(a) for a in dataclasses.astuple(tasks.adapt))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    widths = (int(pretrain[0].shape[1]), sizes.hidden, sizes.hidden, data.CLASSES)
    host = models.init_weights(widths, np.random.default_rng(args.seed))
    base = run.build("full", {k: run.from_host(v) for k, v in host.items()}, settings, run.to_host)
    _train(run, base, pretrain, sizes.pretrain_epochs, "pretraining", args)
    pretrained_accuracy = run.evaluate(base.net, pretrain[2], pretrain[3])
    base.save(out / "base.safetensors")
    results = [
        _adapt(run, method, dict(base.params), settings, adapt, sizes.epochs, out, args) for method in args.methods
    ]

    network = "-".join(map(str, widths))
    plot(
        results,
        out / "accuracy_vs_parameters.png",
        title=f"Digits rotated 90°: MLP {network} pretrained on upright digits",
    )
    report.write(
        results,
        out,
        {
            "task": "pretrain on upright digits, adapt to digits rotated by 90 degrees",
            "backend": args.backend,
            "network": network,
            "pretrained_accuracy": pretrained_accuracy,
            "adapt_train_images": int(adapt[0].shape[0]),
            "adapt_test_images": int(adapt[2].shape[0]),
            "epochs": sizes.epochs,
            "seed": args.seed,
        },
    )
    print(f"pretrained MLP {network}: {100 * pretrained_accuracy:.1f}% on upright test digits ({args.backend} backend)")
    print(
        f"new task: the same digits rotated by 90 degrees ({int(adapt[0].shape[0])} training, "
        f"{int(adapt[2].shape[0])} test images), {sizes.epochs} epochs per method\n"
    )
    print(report.plain(results))
    print(
        f"\nwrote {out}/: results.md, results.json, accuracy_vs_parameters.png, base.safetensors, "
        + ", ".join(r.file for r in results)
    )
    if "vera" in args.methods:
        print(f"try: vera inspect {out / 'vera.safetensors'}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0
