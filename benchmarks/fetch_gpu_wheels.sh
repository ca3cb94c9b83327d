#!/usr/bin/env bash
# Download, into the git-ignored .whl/ folder of the repository root, the wheels that
# benchmarks/gpu_checks.sh installs on a lent GPU machine (x86-64, Python 3.12, no network).
#
#   bash benchmarks/fetch_gpu_wheels.sh            # with PYTHON=python3 (any Python with pip)
#   PYTHON=/work/dev/bin/python bash benchmarks/fetch_gpu_wheels.sh
#
# The GPU image has torch, CuPy, JAX, pytest, pytest-xdist, numpy, accelerate, tokenizers and
# huggingface_hub; vera-core also needs array-api-compat and safetensors, the tests
# array-api-strict and hypothesis, and the benchmarks PEFT and transformers. These are pinned to
# the versions the CPU machine tests with, so that GPU and CPU figures come from the same PEFT and
# transformers; gpu_checks.sh installs a carried wheel only where the machine lacks that version.
# transformers 5.24.0 needs huggingface-hub >=1.31,<3, tokenizers >=0.23.1,<0.24 and
# regex >=2025.10.22 (its import checks them): the image's hub (1.33) and tokenizers (0.23.2)
# fit, and regex is carried in case the image's is older. Any other wheel in .whl/ is removed:
# two versions of one package would stop the whole install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(
    array-api-compat==1.16.0
    array-api-strict==2.6.1
    safetensors==0.8.0
    peft==0.21.2
    transformers==5.24.0
    regex==2026.11.19
    hypothesis==6.170.17
    sortedcontainers==2.4.0
    attrs==26.1.0
)
LIMIT_MIB=60

mkdir -p .whl
for wheel in "${WHEELS[@]}"; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$wheel"
done

# Keep exactly the pinned wheels; check the total against what a device call may carry.
"$PYTHON" - "$LIMIT_MIB" "${WHEELS[@]}" <<'EOF'
import re
import sys
from pathlib import Path

limit_mib, pins = int(sys.argv[1]), sys.argv[2:]


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


wanted = {tuple(normal(part) for part in pin.split("==")) for pin in pins}
kept, total = [], 0
for path in sorted(Path(".whl").glob("*.whl")):
    name, version = path.name.split("-")[:2]
    if (normal(name), normal(version)) not in wanted:
        print(f"removing {path} (not pinned in fetch_gpu_wheels.sh)")
        path.unlink()
        continue
    kept.append(path)
    total += path.stat().st_size
    print(f"{path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
found = {tuple(normal(part) for part in p.name.split("-")[:2]) for p in kept}
missing = sorted("==".join(pin) for pin in wanted - found)
print(f"{total / 2**20:7.2f} MiB  total, {len(kept)} wheels in .whl/")
if missing:
    sys.exit(f"missing after download: {', '.join(missing)}")
if total > limit_mib * 2**20:
    sys.exit(f"the wheels take {total / 2**20:.1f} MiB, over the {limit_mib} MiB a device call should carry")
EOF
