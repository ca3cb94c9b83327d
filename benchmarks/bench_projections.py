"""Time to regenerate the shared projections A (r x max_in) and B (max_out x r) from a seed.

NumPy on one core (BLAS and OpenMP threads set to 1 before NumPy loads), best of
``--repeats`` runs in wall-clock and in CPU time, for the production block size and a sweep of others (the block
size never changes the values; see docs/projection-spec.md). Prints a markdown table.

Run::

    python benchmarks/bench_projections.py                      # r=1024, 11008 x 11008
    python benchmarks/bench_projections.py --rank 256 --dtype float64
"""

from __future__ import annotations

import argparse
import os
import platform
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=1024)
    parser.add_argument("--max-in", type=int, default=11008)
    parser.add_argument("--max-out", type=int, default=11008)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--chunks",
        type=int,
        nargs="*",
        default=[1 << 14, 1 << 16, 1 << 18, 1 << 20],
        help="other block sizes (elements) to compare with the production one",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"  # before NumPy loads its BLAS
    import numpy as np

    from vera_core import generate_projections, projections

    production = projections._CPU_CHUNK
    dtype = np.dtype(args.dtype)

    def run(chunk: int) -> tuple[float, float]:
        """Wall-clock and CPU seconds of one generation (CPU time ignores time lost to other processes)."""
        projections._CPU_CHUNK = chunk
        start, start_cpu = time.perf_counter(), time.process_time()
        generate_projections(0, args.rank, args.max_in, args.max_out, xp=np, dtype=dtype)
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        projections._CPU_CHUNK = production
        return wall, cpu

    chunks = [production, *sorted(set(args.chunks) - {production})]
    runs: dict[int, list[tuple[float, float]]] = {chunk: [] for chunk in chunks}
    run(production)  # warm-up: first-touch page faults of the result buffers
    for _ in range(args.repeats):  # block sizes take turns, so load drifts hit them alike
        for chunk in chunks:
            runs[chunk].append(run(chunk))

    elements = args.rank * (args.max_in + args.max_out)
    print(
        f"NumPy {np.__version__}, 1 thread, {platform.processor() or platform.machine()}, "
        f"r={args.rank}, max_in={args.max_in}, max_out={args.max_out}, {args.dtype}, "
        f"{elements / 1e6:.1f}M elements, best of {args.repeats}\n"
    )
    print("| block (elements) | wall seconds | CPU seconds | CPU ns / element |")
    print("|---|---|---|---|")
    for chunk in chunks:
        wall, cpu = (min(times) for times in zip(*runs[chunk], strict=True))
        label = f"{chunk} (production)" if chunk == production else str(chunk)
        print(f"| {label} | {wall:.3f} | {cpu:.3f} | {cpu / elements * 1e9:.1f} |")


if __name__ == "__main__":
    main()
