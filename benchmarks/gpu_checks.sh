#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: the GPU benchmarks, the many-users demo on CuPy
# and the test suite on the GPU backends (torch-cuda, cupy, jax). Every result goes to the folder given (default
# ./gpu-results) as well as to the terminal.
#
#   PYTHONPATH=src:src/backends bash benchmarks/gpu_checks.sh [results-folder]
#
# Needs torch with CUDA, cupy, jax, peft, transformers, pytest, hypothesis and the project's
# dependencies importable.
set -u -o pipefail
results=${1:-gpu-results}
mkdir -p "$results"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0
nvidia-smi -L | tee "$results/device.txt"
python3 -c "import torch, cupy, jax; print('torch', torch.__version__, 'cupy', cupy.__version__, 'jax', jax.__version__, jax.devices())" | tee -a "$results/device.txt"

timeout 240 python3 benchmarks/bench_torch_layer.py --device cuda --dtype bfloat16 --repeats 20 \
    --profile vera dvora 2>&1 | grep -v Warning | tee "$results/bench_torch_layer.md" || status=1
timeout 300 python3 benchmarks/bench_torch_layer.py --device cuda --dtype bfloat16 --repeats 20 \
    --sizes 8192x4096x4096 --compile reduce-overhead 2>&1 | grep "^[|#]" \
    | tee "$results/bench_torch_layer_compiled.md" || status=1
timeout 120 python3 benchmarks/bench_numpy_layer.py --backend cupy --tokens 8192 --features 4096 2>&1 \
    | tee "$results/bench_cupy_layer.md" || status=1
timeout 60 python3 benchmarks/bench_projections_device.py 2>&1 | tee "$results/bench_projections_device.md" || status=1
timeout 150 python3 -m vera_cli demo --tenants --backend cupy --no-progress --out "$results/demo-tenants-cupy" 2>&1 \
    | tee "$results/demo_tenants_cupy.txt" || status=1

VERA_BACKENDS=torch-cuda,cupy,jax HYPOTHESIS_PROFILE=ci timeout 420 python3 -m pytest -q -p no:cacheprovider \
    -n 6 --tb=short tests/core tests/torch tests/array_backends tests/interop > "$results/pytest.txt" 2>&1 || status=1
grep -E "^(FAILED|ERROR)|passed|failed" "$results/pytest.txt" | tail -40
exit $status
