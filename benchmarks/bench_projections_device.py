"""Projection generation on every installed array library and device, checked bit-identical to NumPy.

Times ``generate_projections(0, r, max_in, max_out)`` (float32) per backend: best of
``--repeats`` after one warm-up, synchronised, and compares every bit of A and B with
NumPy's on the host. Backends that are not installed (or have no GPU) are listed as such.

Run::

    PYTHONPATH=src:src/backends python benchmarks/bench_projections_device.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from vera_core import generate_projections


def _torch(device: str) -> tuple[Any, Any, Callable[[], None], Callable[[Any], np.ndarray]]:
    import array_api_compat.torch as xp
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return xp, torch.device(device), sync, lambda a: a.cpu().numpy()


def _cupy() -> tuple[Any, Any, Callable[[], None], Callable[[Any], np.ndarray]]:
    import array_api_compat.cupy as xp
    import cupy

    return xp, cupy.cuda.Device(0), cupy.cuda.Device(0).synchronize, cupy.asnumpy


def _jax() -> tuple[Any, Any, Callable[[], None], Callable[[Any], np.ndarray]]:
    import jax
    import jax.numpy as xp

    return xp, jax.devices()[0], lambda: None, lambda a: np.asarray(jax.block_until_ready(a))


BACKENDS: dict[str, Callable[[], tuple[Any, Any, Callable[[], None], Callable[[Any], np.ndarray]]]] = {
    "torch-cpu": lambda: _torch("cpu"),
    "torch-cuda": lambda: _torch("cuda"),
    "cupy": _cupy,
    "jax": _jax,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=1024)
    parser.add_argument("--max-in", type=int, default=11008)
    parser.add_argument("--max-out", type=int, default=11008)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = (0, args.rank, args.max_in, args.max_out)

    start = time.perf_counter()
    reference = generate_projections(*shape, xp=np)
    numpy_seconds = time.perf_counter() - start
    print(f"r={args.rank}, max_in={args.max_in}, max_out={args.max_out}, float32\n")
    print("| backend | device | seconds (best) | speed vs NumPy | bit-identical to NumPy |")
    print("|---|---|---|---|---|")
    print(f"| numpy | cpu | {numpy_seconds:.3f} | 1.00x | (reference) |")
    for name, load in BACKENDS.items():
        try:
            xp, device, sync, to_host = load()
        except (ImportError, RuntimeError) as exc:
            print(f"| {name} | - | not run: {exc} | | |")
            continue
        result = generate_projections(*shape, xp=xp, device=device)  # warm-up (JIT, allocator)
        sync()
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = generate_projections(*shape, xp=xp, device=device)
            sync()
            best = min(best, time.perf_counter() - start)
        identical = all(
            np.array_equal(to_host(got).view(np.uint32), want.view(np.uint32))
            for got, want in zip(result, reference, strict=True)
        )
        print(f"| {name} | {device} | {best:.3f} | {numpy_seconds / best:.2f}x | {identical} |", flush=True)


if __name__ == "__main__":
    main()
