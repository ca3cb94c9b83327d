"""``vera demo --tenants N``: one pretrained network, N users, each with its own adapter, trained in one run.

Every user gets its own variant of the task: the digits rotated by the user's own angle
(uniform in [-180, 180) degrees). The MLP is pretrained on upright digits, then all N
users' VeRA adapters are trained together, in one batched run over an adapter bank: each
step holds a few images of every user, each row served and trained by its own adapter.
The demo reports the distribution of per-user accuracy before and after, the storage of
N adapters against N LoRA adapters and N copies of the model, and serves one mixed batch
of all users against the bare model; it writes a JSON and Markdown report, a plot, and
one ordinary adapter file per user.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from vera_cli.demo import data, methods, models
from vera_cli.demo.plot import human_bytes, plot_tenants
from vera_cli.demo.runner import _bar, _train, engine, require
from vera_core.atomic import write_file

DEFAULT_USERS = 1000
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
QUANTILE_NAMES = ("min", "10%", "25%", "median", "75%", "90%", "max")
LEARNING_RATE = 0.1
PRETRAIN_BATCH = 32
"""The pretraining batch (the four-methods demo's)."""


@dataclasses.dataclass(frozen=True)
class TenantSizes:
    """The run's sizes, from the arguments (``--quick`` shrinks them)."""

    users: int
    hidden: int
    rank: int
    epochs: int
    pretrain_epochs: int
    images_per_user: int
    rows_per_user: int
    limit: int | None
    serve_repeats: int

    @classmethod
    def of(cls, args: argparse.Namespace) -> TenantSizes:
        if args.quick:
            return cls(args.tenants, 32, 32, 4, 8, 64, 8, 1000, 5)
        return cls(
            args.tenants,
            args.hidden or 64,
            args.rank or 64,
            args.epochs or 10,
            args.pretrain_epochs,
            256,
            args.batch_size or 8,
            None,
            25,
        )


@dataclasses.dataclass(frozen=True)
class Users:
    """Every user's task: its angle, its training images (users, images, 64), its test images."""

    angles: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    """(images,): the same digits for every user, each seen at the user's own angle."""


def make_users(split: data.Split, count: int, images: int, rng: np.random.Generator) -> Users:
    """``count`` users, each with its own angle and ``images`` of the training digits drawn for it."""
    angles = rng.uniform(-180.0, 180.0, count)
    images = min(images, int(split.x_train.shape[0]))
    picked = np.stack([rng.choice(split.x_train.shape[0], images, replace=False) for _ in range(count)])
    return Users(
        angles,
        data.rotate_by(split.x_train[picked], angles),
        split.y_train[picked],
        data.rotate_by(split.x_test, angles),
        split.y_test,
    )


def storage(widths: tuple[int, ...], users: int, rank: int, lora_rank: int) -> dict[str, int]:
    """Bytes (float32) of ``users`` VeRA adapters, LoRA adapters of ``lora_rank``, and copies of the model.

    Examples
    --------
    >>> storage((64, 64, 64, 10), 1, 64, 4)
    {'vera': 1320, 'lora': 5280, 'full_copies': 35880}
    """
    layers = list(itertools.pairwise(widths))
    vera = sum(rank + n_out for _, n_out in layers)
    lora = sum(lora_rank * (n_in + n_out) for n_in, n_out in layers)
    full = sum(n_in * n_out + n_out for n_in, n_out in layers)
    return {"vera": 4 * vera * users, "lora": 4 * lora * users, "full_copies": 4 * full * users}


def _engine_class(backend: str) -> Any:
    if backend == "torch":
        from vera_cli.demo.tenant_torch import TorchTenants

        return TorchTenants
    from vera_cli.demo.tenant_numpy import NumpyTenants

    return NumpyTenants


def _quantiles(values: np.ndarray) -> list[float]:
    return [float(q) for q in np.quantile(values, QUANTILES)]


def run_tenants(args: argparse.Namespace) -> int:
    """Run the many-users demo; write everything into ``args.out``."""
    started = time.perf_counter()
    require({"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm", "safetensors": "safetensors"})
    run = engine(args.backend)
    tenants_class = _engine_class(args.backend)
    args.progress = args.progress and sys.stderr.isatty()  # bars only on a terminal
    sizes = TenantSizes.of(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    halves = data.load_halves(args.seed, limit=sizes.limit)
    pretrain = tuple(run.from_host(a) for a in dataclasses.astuple(halves.pretrain))
    widths = (int(halves.pretrain.x_train.shape[1]), sizes.hidden, sizes.hidden, data.CLASSES)
    settings = methods.Settings(vera_rank=sizes.rank, lora_rank=args.lora_rank, seed=args.seed)
    host = models.init_weights(widths, np.random.default_rng(args.seed))
    base = run.build("full", {k: run.from_host(v) for k, v in host.items()}, settings, run.to_host)
    pretraining = argparse.Namespace(**{**vars(args), "batch_size": PRETRAIN_BATCH})
    _train(run, base, pretrain, sizes.pretrain_epochs, "pretraining", pretraining)
    pretrained_accuracy = run.evaluate(base.net, pretrain[2], pretrain[3])
    weights = {name: run.to_host(value) for name, value in base.params.items()}
    base.save(out / "tenants_base.safetensors")

    users = make_users(halves.adapt, sizes.users, sizes.images_per_user, np.random.default_rng(args.seed + 1))
    digits = len(str(sizes.users - 1))
    names = [f"user{u:0{digits}d}" for u in range(sizes.users)]
    on_device = {name: run.from_host(value) for name, value in weights.items()}
    tenants = tenants_class(
        on_device, names, rank=sizes.rank, seed=args.seed, from_host=run.from_host, to_host=run.to_host
    )
    before = tenants.accuracy(users.x_test, users.y_test)
    steps = sizes.epochs * max(1, users.x_train.shape[1] // sizes.rows_per_user)
    tick = time.perf_counter()
    with _bar(steps, f"{sizes.users:,} users", args.progress) as bar:
        loss = tenants.train(
            users.x_train,
            users.y_train,
            epochs=sizes.epochs,
            rows_per_user=sizes.rows_per_user,
            lr=LEARNING_RATE,
            seed=args.seed,
            progress=bar,
        )
    train_seconds = time.perf_counter() - tick
    after = tenants.accuracy(users.x_test, users.y_test)
    served = tenants.serve(np.ascontiguousarray(users.x_test[:, 0, :]), sizes.serve_repeats)
    folder = out / "tenants"
    folder.mkdir(exist_ok=True)
    files = tenants.save(folder)
    file_bytes = sum(path.stat().st_size for path in files)
    bytes_ = storage(widths, sizes.users, sizes.rank, args.lora_rank)

    network = "-".join(map(str, widths))
    n = sizes.users
    storage_bars = [
        (f"VeRA r={sizes.rank}", bytes_["vera"]),
        (f"LoRA r={args.lora_rank}", bytes_["lora"]),
        (f"{n:,} model copies", bytes_["full_copies"]),
    ]
    plot_tenants(
        out / "tenants.png",
        angles=users.angles.tolist(),
        before=before.tolist(),
        after=after.tolist(),
        storage=storage_bars,
        title=f"{n:,} users, each with its own rotation of the digits: MLP {network} pretrained on upright digits, "
        f"one VeRA adapter per user, all trained in one batched run",
    )
    rows_per_second = {name: n / seconds for name, seconds in served.items()}
    total_seconds = time.perf_counter() - started
    report = {
        "task": "pretrain on upright digits; every user adapts to the digits rotated by its own angle",
        "backend": args.backend,
        "users": n,
        "network": network,
        "pretrained_accuracy": pretrained_accuracy,
        "rank": sizes.rank,
        "epochs": sizes.epochs,
        "images_per_user": int(users.x_train.shape[1]),
        "test_images_per_user": int(users.x_test.shape[1]),
        "rows_per_step": n * sizes.rows_per_user,
        "steps": steps,
        "final_loss": loss,
        "quantiles": {"q": list(QUANTILES), "before": _quantiles(before), "after": _quantiles(after)},
        "bytes": {**bytes_, "vera_files": file_bytes, "lora_rank": args.lora_rank},
        "seconds": {"add_adapters": tenants.add_seconds, "train": train_seconds, "total": total_seconds},
        "serving": {"rows": n, "seconds": served, "rows_per_second": rows_per_second},
        "angles": users.angles.tolist(),
        "accuracy_before": before.tolist(),
        "accuracy_after": after.tolist(),
        "seed": args.seed,
    }
    text = _summary(report, sizes)
    write_file(out / "tenants.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    write_file(out / "tenants.md", lambda tmp: Path(tmp).write_text(_markdown(report) + "\n"))
    print(text)
    print(
        f"wrote {out}/: tenants.md, tenants.json, tenants.png, tenants_base.safetensors (the pretrained model), "
        f"tenants/ ({len(files):,} adapter files, {human_bytes(file_bytes)})"
    )
    base_file, merged = out / "tenants_base.safetensors", f"{files[0].stem}_model.safetensors"
    print(f"try: vera inspect {files[0]}; vera merge --base {base_file} --adapter {files[0]} -o {merged}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


def _quantile_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    q = report["quantiles"]
    return [
        ("before adaptation", *(f"{100 * v:.1f}%" for v in q["before"])),
        ("after, one batched run", *(f"{100 * v:.1f}%" for v in q["after"])),
    ]


def _summary(report: dict[str, Any], sizes: TenantSizes) -> str:
    n, served, bytes_ = report["users"], report["serving"]["seconds"], report["bytes"]
    header = ("per-user test accuracy", *QUANTILE_NAMES)
    rows = [header, *_quantile_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = "\n".join(
        "  ".join([row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))])
        for row in rows
    )
    rates = report["serving"]["rows_per_second"]
    return "\n".join(
        [
            f"pretrained MLP {report['network']}: {100 * report['pretrained_accuracy']:.1f}% on upright test digits "
            f"({report['backend']} backend)",
            f"{n:,} users, each with the digits rotated by its own angle: {report['images_per_user']} training and "
            f"{report['test_images_per_user']} test images per user",
            f"{n:,} VeRA adapters (r={report['rank']}) added in {report['seconds']['add_adapters']:.2f} s and trained "
            f"in one batched run: {report['steps']} steps of {report['rows_per_step']:,} rows "
            f"({sizes.rows_per_user} per user) in {report['seconds']['train']:.1f} s",
            "",
            table,
            "",
            f"storage for {n:,} users: VeRA {human_bytes(bytes_['vera'])} of vectors "
            f"({human_bytes(bytes_['vera_files'])} in {n:,} files), LoRA r={bytes_['lora_rank']} "
            f"{human_bytes(bytes_['lora'])}, {n:,} copies of the model {human_bytes(bytes_['full_copies'])}",
            f"serving one batch of {n:,} rows, each row a different user: {rates['mixed']:,.0f} rows/s; "
            f"the bare model {rates['base']:,.0f} rows/s, one adapter for every row {rates['one adapter']:,.0f} rows/s "
            f"(mixed: {served['mixed'] / served['base']:.1f}x the bare model's time, "
            f"{served['mixed'] / served['one adapter']:.2f}x one adapter's)",
        ]
    )


def _markdown(report: dict[str, Any]) -> str:
    header = ("per-user test accuracy", *QUANTILE_NAMES)
    lines = ["| " + " | ".join(header) + " |", "|:--" + "|--:" * len(QUANTILE_NAMES) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in _quantile_rows(report)]
    n, bytes_ = report["users"], report["bytes"]
    served = report["serving"]["seconds"]
    lines += [
        "",
        f"| storage for {n:,} users | bytes |",
        "|:--|--:|",
        f"| VeRA r={report['rank']} (vectors) | {bytes_['vera']:,} |",
        f"| VeRA r={report['rank']} ({n:,} adapter files) | {bytes_['vera_files']:,} |",
        f"| LoRA r={bytes_['lora_rank']} | {bytes_['lora']:,} |",
        f"| {n:,} copies of the model | {bytes_['full_copies']:,} |",
        "",
        f"| one batch of {n:,} rows | seconds | rows/s |",
        "|:--|--:|--:|",
        *(
            f"| {name} | {served[name]:.5f} | {report['serving']['rows_per_second'][name]:,.0f} |"
            for name in ("base", "one adapter", "mixed")
        ),
    ]
    return "\n".join(lines)
