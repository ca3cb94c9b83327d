"""DVoRA costs on the CPU: the Gram-form norm against the dense norm, and a training step against VeRA's.

1. Norm ``||W0 + dW||`` per output row at out = in = ``--norm-features``: the Gram form
   (:func:`vera_core.dvora_norm`, O(out r^2) per step after a once-per-layer
   :func:`vera_core.dvora_precompute`) against forming ``dW`` (:func:`vera_core.dense_norm`).
2. One forward+backward step of a layer (tokens x in x out, rank r): the bare frozen
   matmul (``x W^T``, then ``g W``), VeRA, and DVoRA with the exact and the detached norm
   backward, all through the functional core; ``dL/dx`` includes the frozen weight's share.

float32, NumPy and PyTorch (CPU), ``--threads`` threads. The cases of each table take
turns (after a warm-up) so that load drifts hit them alike; medians and minima, ratios
from the same run. Prints markdown tables.

Run::

    python benchmarks/bench_dvora.py
    python benchmarks/bench_dvora.py --libraries numpy --threads 1
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
    parser.add_argument("--libraries", nargs="+", choices=["numpy", "torch"], default=["numpy", "torch"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--norm-features", type=int, default=4096)
    parser.add_argument("--norm-ranks", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--features", type=int, default=1024, help="in = out features of the step")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    return parser.parse_args()


def measure(cases: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each case; the cases take turns."""
    for step in cases.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, step in cases.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


class Library:
    """Random float32 arrays of one library, and its version string."""

    def __init__(self, name: str, threads: int) -> None:
        import numpy as np

        self.name = name
        self.rng = np.random.default_rng(0)
        if name == "torch":
            import array_api_compat.torch as xp
            import torch

            torch.set_num_threads(threads)
            self.xp, self.version = xp, f"PyTorch {torch.__version__}"
            self.convert: Callable[[Any], Any] = torch.from_numpy
        else:
            self.xp, self.version, self.convert = np, f"NumPy {np.__version__}", np.asarray

    def normal(self, *shape: int, scale: float = 1.0) -> Any:
        return self.convert((self.rng.standard_normal(shape) * scale).astype("float32"))


def norm_cases(lib: Library, features: int, rank: int) -> dict[str, Callable[[], Any]]:
    import vera_core as vc

    A, B = vc.generate_projections(0, rank, features, features, xp=lib.xp)
    W = lib.normal(features, features, scale=features**-0.5)
    d, b = lib.normal(rank, scale=0.1), lib.normal(features, scale=0.1)
    frozen = vc.dvora_precompute(W, A, rank)
    return {
        "Gram form (per step)": lambda: vc.dvora_norm(frozen, B, d, b),
        "dense": lambda: vc.dense_norm(W, A, B, d, b),
        "precompute (once per layer)": lambda: vc.dvora_precompute(W, A, rank),
    }


def step_cases(lib: Library, tokens: int, features: int, rank: int) -> dict[str, Callable[[], Any]]:
    import vera_core as vc

    A, B = vc.generate_projections(0, rank, features, features, xp=lib.xp)
    W = lib.normal(features, features, scale=features**-0.5)
    x, g = lib.normal(tokens, features), lib.normal(tokens, features)
    d, b = lib.normal(rank, scale=0.1), lib.normal(features, scale=0.1)
    frozen, m = vc.dvora_precompute(W, A, rank), vc.initial_magnitude(W)

    def bare() -> Any:
        return vc.linear(x, W), vc.linear_input_grad(g, W)

    def vera() -> Any:
        y, u = vc.vera_forward(x, A, B, d, b, base=vc.linear(x, W))
        grads = vc.vera_backward(g, u, A, B, d, b, in_features=features)
        return y, grads.x + vc.linear_input_grad(g, W)

    def dvora(detach_norm: bool) -> Callable[[], Any]:
        def step() -> Any:
            y, saved = vc.dvora_forward(x, vc.linear(x, W), frozen, A, B, m, d, b)
            grads = vc.dvora_backward(g, saved, frozen, A, B, m, d, b, in_features=features, detach_norm=detach_norm)
            return y, grads.x + vc.linear_input_grad(grads.base, W)

        return step

    return {
        "bare frozen matmul": bare,
        "VeRA": vera,
        "DVoRA (exact norm grad)": dvora(False),
        "DVoRA (detached norm)": dvora(True),
    }


def table(title: str, times: dict[str, list[float]], reference: str, extra: dict[str, str] | None = None) -> None:
    print(f"\n{title}\n")
    print(f"| case | median ms | min ms | median / {reference} |" + (" vs VeRA |" if extra else ""))
    print("|---|---|---|---|" + ("---|" if extra else ""))
    base = statistics.median(times[reference])
    for name, samples in times.items():
        median = statistics.median(samples)
        row = f"| {name} | {median * 1e3:.2f} | {min(samples) * 1e3:.2f} | {median / base:.2f}x |"
        if extra:
            row += f" {extra.get(name, '')} |"
        print(row)


def main() -> None:
    args = parse_args()
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(args.threads)  # before NumPy loads its BLAS
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, float32")
    for name in args.libraries:
        lib = Library(name, args.threads)
        for rank in args.norm_ranks:
            times = measure(norm_cases(lib, args.norm_features, rank), args.repeats, args.warmup)
            table(f"{lib.version}: norm, out = in = {args.norm_features}, r = {rank}", times, "Gram form (per step)")
        times = measure(step_cases(lib, args.tokens, args.features, args.rank), args.repeats, args.warmup)
        vera = statistics.median(times["VeRA"])
        versus = {case: f"{statistics.median(times[case]) / vera:.2f}x" for case in times if case.startswith("DVoRA")}
        shape = f"{args.tokens} x {args.features} x {args.features}, r = {args.rank}"
        table(f"{lib.version}: forward+backward step, {shape}", times, "bare frozen matmul", versus)


if __name__ == "__main__":
    main()
