"""Adapted layer forward+backward against the bare frozen matmul, same backend, same run.

Bare layer: forward ``y = x W^T``, backward ``dx = g W`` (the weight is frozen, so no
weight gradient). Adapted layers: ``VeraLinear`` / ``DVoraLinear`` forward, then
backward with the vector gradients and ``dx``. Each case runs ``--repeats`` times, the cases taking
turns (after ``--warmup`` runs each); medians and minima, with ratios to the bare layer
measured in the same process.

Run::

    PYTHONPATH=src:src/backends python benchmarks/bench_numpy_layer.py            # NumPy, 2 threads
    PYTHONPATH=src:src/backends python benchmarks/bench_numpy_layer.py --backend cupy
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--features", type=int, default=1024, help="in = out features")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads (NumPy)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    return parser.parse_args()


def measure(
    cases: dict[str, Callable[[], Any]], sync: Callable[[], None], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each case; the cases take turns, so load drifts hit them alike."""
    for step in cases.values():
        for _ in range(warmup):
            step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, step in cases.items():
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    args = parse_args()
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(args.threads)  # before NumPy loads its BLAS
    import numpy as np

    import vera_core as vc
    from vera_numpy import DVoraLinear, VeraLinear

    if args.backend == "cupy":
        import array_api_compat.cupy as xp
        import cupy

        device_name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()

        def sync() -> None:
            cupy.cuda.Device().synchronize()

        def place(array: np.ndarray) -> Any:
            return cupy.asarray(array)
    else:
        import array_api_compat.numpy as xp

        device_name = f"{platform.processor() or platform.machine()}, {args.threads} BLAS threads"

        def sync() -> None:
            return None

        def place(array: np.ndarray) -> Any:
            return array

    rng = np.random.default_rng(0)
    n, d, r = args.tokens, args.features, args.rank
    weight = place((rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32))
    x = place(rng.standard_normal((n, d)).astype(np.float32))
    grad = place(rng.standard_normal((n, d)).astype(np.float32))
    A, B = vc.generate_projections(0, r, d, d, xp=xp, device=None)

    def bare() -> None:
        xp.matmul(x, weight.T)
        xp.matmul(grad, weight)

    def adapted(layer: Any) -> Callable[[], None]:
        layer.load_parameters({"lambda_b": xp.full(d, 0.01, dtype=xp.float32)})

        def step() -> None:
            layer.forward(x)
            layer.backward(grad)
            layer.zero_grad()

        return step

    cases = {
        "bare matmul (x W^T, g W)": bare,
        "VeraLinear": adapted(VeraLinear(weight, A, B)),
        "DVoraLinear (exact norm)": adapted(DVoraLinear(weight, A, B)),
        "DVoraLinear (detach_norm)": adapted(DVoraLinear(weight, A, B, detach_norm=True)),
    }
    times = measure(cases, sync, args.repeats, args.warmup)
    medians = {name: statistics.median(values) for name, values in times.items()}
    minima = {name: min(values) for name, values in times.items()}
    bare_name = next(iter(cases))
    print(
        f"backend {args.backend} ({device_name}); tokens x in x out = {n} x {d} x {d}, r = {r}, float32; "
        f"{args.repeats} interleaved repeats"
    )
    print("| layer | median (ms) | ratio | min (ms) | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in cases:
        print(
            f"| {name} | {medians[name] * 1e3:.1f} | {medians[name] / medians[bare_name]:.2f}x "
            f"| {minima[name] * 1e3:.1f} | {minima[name] / minima[bare_name]:.2f}x |"
        )


if __name__ == "__main__":
    main()
