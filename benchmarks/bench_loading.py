"""Per-file cost of the one verified loader, for banks of many small adapters.

Writes ``--files`` vera-core adapter files (``--layers`` layers of ``--size`` x
``--size``, rank ``--rank``, one shared seed, so one projection key), then times, taking
turns file by file so that machine noise hits both alike:

* ``read_adapter``: :func:`vera_core.read_adapter` plus ``projections()`` (strict
  parsing, byte budget, payload and projection checksums; the projections come from the
  cache after the first file);
* ``safetensors``: ``safetensors.numpy.load_file`` of the same file, which checks nothing
  (the baseline).

Also reports the first (cold) file, which generates and hashes the projections, and the
cache's hit count. Prints a markdown table.

Run::

    python benchmarks/bench_loading.py                      # 2000 files, 16 layers of 1024 x 1024, r=256
    python benchmarks/bench_loading.py --files 10000 --layers 4 --size 512 --rank 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=256)
    return parser.parse_args()


def write_files(folder: Path, args: argparse.Namespace) -> list[Path]:
    import numpy as np

    import vera_core as vc
    from vera_core.adapter_file import AdapterConfig, LayerSpec, projection_checksum, save_adapter_file

    A, B = vc.generate_projections(0, args.rank, args.size, args.size, xp=np)
    layers = {f"layers.{i}.proj": LayerSpec(args.size, args.rank, args.size) for i in range(args.layers)}
    config = AdapterConfig(
        r=args.rank,
        seed=0,
        max_in=args.size,
        max_out=args.size,
        layers=layers,
        projections_sha256=projection_checksum(A, B),
    )
    rng = np.random.default_rng(0)
    paths = []
    for index in range(args.files):
        tensors = {}
        for name in layers:
            tensors[f"{name}.lambda_d"] = rng.standard_normal(args.rank).astype(np.float32)
            tensors[f"{name}.lambda_b"] = rng.standard_normal(args.size).astype(np.float32)
        path = folder / f"adapter-{index:05d}.safetensors"
        save_adapter_file(path, config, tensors)
        paths.append(path)
    return paths


def main() -> None:
    args = parse_args()
    from safetensors.numpy import load_file

    from vera_core.loading import ProjectionCache, read_adapter

    with tempfile.TemporaryDirectory() as folder:
        paths = write_files(Path(folder), args)
        cache = ProjectionCache()
        start = time.perf_counter()
        read_adapter(paths[0]).projections(cache=cache)
        cold = time.perf_counter() - start
        ours, baseline = [], []
        for path in paths:
            start = time.perf_counter()
            read_adapter(path).projections(cache=cache)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            load_file(str(path))
            baseline.append(time.perf_counter() - start)
        size = paths[0].stat().st_size
    median_ours, median_base = statistics.median(ours), statistics.median(baseline)
    print(
        f"{args.files} files of {size:,} bytes ({args.layers} layers {args.size} x {args.size}, r={args.rank}); "
        f"cache: {cache.misses} generation(s), {cache.hits} hits"
    )
    print()
    print("| reader                          | median us / file | total s | ratio |")
    print("|---------------------------------|------------------|---------|-------|")
    print(
        f"| read_adapter + projections()    | {median_ours * 1e6:16.0f} | {sum(ours):7.2f} "
        f"| {median_ours / median_base:5.2f} |"
    )
    print(f"| safetensors.numpy.load_file     | {median_base * 1e6:16.0f} | {sum(baseline):7.2f} | 1.00  |")
    print(f"| first file (generates, hashes)  | {cold * 1e6:16.0f} |         |       |")


if __name__ == "__main__":
    main()
