#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one script for a lent H100/H200 machine.
#
#   bash benchmarks/fetch_gpu_wheels.sh               # here first, once: the wheels into .whl/
#   VERA_COMMIT=<hash> bash benchmarks/gpu_checks.sh [RESULTS]   # there (RESULTS: default $OUT, else ./gpu-results)
#   bash benchmarks/gpu_checks.sh --only train-compiled,tests-cupy [RESULTS]   # rerun some parts
#   bash benchmarks/gpu_checks.sh --dry-run [RESULTS] # on a CPU machine: the script's logic, tiny sizes
#
# It installs the carried wheels (.whl/, git-ignored; see fetch_gpu_wheels.sh) that the machine
# lacks into /tmp/site, then runs these parts in order, each with its own time limit, going on past
# a part that fails:
#
#   tests-torch-cuda pytest, VERA_BACKENDS=torch-cuda: the tests that run on the GPU (-k "cuda or docs")
#   tests-cupy       pytest, VERA_BACKENDS=cupy: the tests that run on CuPy (-k cupy)
#   layer-eager      benchmarks/bench_torch_layer.py, bf16, 8192x4096x4096 and 2048x1024x1024
#   layer-compiled   the layer benchmark under torch.compile(mode="reduce-overhead") (CUDA graphs)
#   train-eager      benchmarks/bench_train_step.py, bf16, whole Llama-style training step
#   many-adapters    benchmarks/bench_many_adapters.py --device cuda: add, serve, train
#   tenants-cupy     vera demo --tenants on CuPy (1,000 users in one batched run)
#   train-compiled   the training step under torch.compile(mode="reduce-overhead"), checkpointing off
#
# The whole run keeps within VERA_GPU_BUDGET_S seconds (default 400, under 7 minutes; 1500 with
# --dry-run, which also gives each part 4x its limit, the CPU being slower). A part whose turn
# comes with less than 20 s left is skipped and says so; a part's limit is cut to what is left.
# VERA_GPU_SITE (default /tmp/site) is where the wheels go. Results (at most 8 files, as a device
# call returns them):
#
#   RESULTS/report.md        the device, the package versions, every part's command and tables,
#                            and a summary of which parts passed, failed, timed out or were skipped
#   RESULTS/log.txt          everything the parts wrote to stderr, and the full pytest output
#   RESULTS/train_step_*.json every number of the training-step benchmarks
#
# Exit status: 0 when every part that ran passed and none was skipped, 1 otherwise.
set -u -o pipefail
cd "$(dirname "$0")/.."

dry=0
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1; shift ;;
        --only) only=",$2,"; shift 2 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
        -*) echo "gpu_checks.sh: unknown option $1 (expected --dry-run, --only PARTS, or a results folder)" >&2; exit 2 ;;
        *) break ;;
    esac
done
parts=",tests-torch-cuda,tests-cupy,layer-eager,layer-compiled,train-eager,many-adapters,tenants-cupy,train-compiled,"
for name in ${only//,/ }; do
    if [[ $parts != *",$name,"* ]]; then
        echo "gpu_checks.sh: --only: no part named '$name' (parts: ${parts:1:-1})" >&2
        exit 2
    fi
done
results=${1:-${OUT:-gpu-results}}
mkdir -p "$results" || exit 2
results=$(cd "$results" && pwd)
report="$results/report.md"
log="$results/log.txt"
: >"$report"
: >"$log"
PY=${PYTHON:-python3}
budget=${VERA_GPU_BUDGET_S:-$([ $dry = 1 ] && echo 1500 || echo 400)}
stretch=$([ $dry = 1 ] && echo 4 || echo 1)  # a dry run compiles on a slow CPU: 4x each part's limit
start=$SECONDS
summary=()
failed=0

say() { echo "$*" | tee -a "$report"; }

export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci XLA_PYTHON_CLIENT_PREALLOCATE=false
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/vera-inductor-cache}

# --- the carried wheels: installed only where the machine lacks that exact version ----------
site=${VERA_GPU_SITE:-/tmp/site}
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
    missing=$("$PY" - <<'EOF'
import importlib.metadata as md
from pathlib import Path

for wheel in sorted(Path(".whl").glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have != version:
        print(wheel)
EOF
    )
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086  # one wheel path per word
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $missing \
            >>"$log" 2>&1 || { echo "installing the carried wheels failed (see $log)" | tee -a "$report"; exit 1; }
        installed=$(echo "$missing" | xargs -n1 basename | tr '\n' ' ')
    else
        installed="none (the machine has every carried version)"
    fi
else
    installed="none (no .whl/ folder: run benchmarks/fetch_gpu_wheels.sh before the device call, and carry .whl)"
fi
export PYTHONPATH="$site:$PWD/src:$PWD/src/backends${PYTHONPATH:+:$PYTHONPATH}"

# --- the device and the versions -------------------------------------------------------------
mode="CUDA"
[ $dry = 1 ] && mode="DRY RUN on the CPU (tiny sizes; tests only collected): checks this script, measures nothing"
# the device's copy of the tree may carry no git history of its own: the caller names the commit
commit=${VERA_COMMIT:-}
if [ -z "$commit" ]; then
    commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown) (read from the git of the copy: set VERA_COMMIT)"
fi
say "# vera-core GPU checks, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit"
say ""
say "Mode: $mode. Time budget: ${budget} s. Carried wheels installed: $installed"
say ""
say '```'
if [ $dry = 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$report"
fi
"$PY" - <<'EOF' 2>>"$log" | tee -a "$report"
import importlib
import platform

print("python", platform.python_version(), platform.machine())
for name in ("torch", "cupy", "jax", "numpy", "array_api_compat", "array_api_strict", "safetensors", "peft",
             "transformers", "pytest", "xdist", "hypothesis"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}  ({module.__file__})")
    except Exception as exc:  # a missing or broken package: the parts that need it fail and say so
        print(f"{name}: NOT IMPORTABLE ({type(exc).__name__}: {exc})")
import torch

print("torch.cuda.is_available()", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
say '```'
if [ $dry = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>>"$log"; then
    say ""
    say "**No CUDA device visible to torch: nothing measured.** (--dry-run checks this script on a CPU machine.)"
    exit 1
fi
xdist=()
if "$PY" -c "import xdist" 2>/dev/null; then
    xdist=(-n "${VERA_GPU_TEST_WORKERS:-8}")
fi

# --- one part: its own time limit, within what is left of the budget -------------------------
# part NAME LIMIT_S DESCRIPTION -- COMMAND...   (stdout to the report, stderr to the log)
part() {
    local name=$1 limit=$2 description=$3
    shift 4
    if [ -n "$only" ] && [[ $only != *",$name,"* ]]; then
        return
    fi
    local left=$((budget - (SECONDS - start)))
    say ""
    say "## $name: $description"
    say ""
    if [ "$left" -lt 20 ]; then
        say "SKIPPED: ${left} s of the ${budget} s budget left. Rerun with: bash benchmarks/gpu_checks.sh --only $name"
        summary+=("| $name | SKIPPED (time budget) | 0 |")
        failed=1
        return
    fi
    limit=$((limit * stretch))
    [ "$limit" -gt "$left" ] && limit=$left
    say "\`$(printf '%q ' "$@")\` (limit ${limit} s)"
    say ""
    echo "=== $name: $*" >>"$log"
    local t0=$SECONDS rc
    timeout -k 10 "$limit" bash -c '"$@"' part "$@" 2>>"$log" | tee -a "$report"
    rc=${PIPESTATUS[0]}
    local took=$((SECONDS - t0)) status
    case $rc in
        0) status="passed" ;;
        124|137) status="TIMED OUT after ${limit} s"; failed=1 ;;
        *) status="FAILED (exit $rc; see log.txt)"; failed=1 ;;
    esac
    say ""
    say "$name: $status in ${took} s"
    summary+=("| $name | $status | $took |")
}

# pytest with its full output in the log and the result lines in the report (run by part's bash -c)
tests() {
    local backend=$1
    shift
    local out command=("$PY" -m pytest -q -p no:cacheprovider -rfE --tb=short "$@")
    out=$(mktemp)
    echo "VERA_BACKENDS=$backend $(printf '%q ' "${command[@]}")"
    echo
    VERA_BACKENDS=$backend "${command[@]}" >"$out" 2>&1
    local rc=$?
    cat "$out" >>"$log"
    grep -E "^(FAILED|ERROR) |^=* ?[0-9]+(/[0-9]+)? (passed|failed|errors?|skipped|tests? collected)|no tests ran" \
        "$out" | tail -40
    rm -f "$out"
    return $rc
}
export -f tests
export PY log

if [ $dry = 0 ]; then
    device=(--device cuda --dtype bfloat16)
    layer_sizes=(--sizes 8192x4096x4096 2048x1024x1024 --repeats 20)
    step_size=(--repeats 20)
    collect=()
else
    device=(--device cpu --dtype bfloat16)
    layer_sizes=(--sizes 64x32x32 --rank 8 --repeats 2 --warmup 1)
    step_size=(--layers 1 --hidden 32 --intermediate 48 --heads 4 --vocab 64 --seq 32 --r 8 --lora-r 4 --repeats 2 --warmup 1)
    collect=(--collect-only)
fi

# The tests first (correctness on the GPU), then the figures; a part that no longer fits is
# skipped and can be rerun with --only. The CPU-only tests run in CI.
# The tests that use the GPU: parametrized for the backend, or named for it (test_torch_cuda.py,
# test_array_cupy.py), and docs/torch.md's examples (its CUDA-graphs example runs only on a GPU).
part tests-torch-cuda 100 "the tests on torch-cuda (VERA_BACKENDS=torch-cuda)" -- \
    tests torch-cuda "${xdist[@]}" "${collect[@]}" tests/core tests/array_backends tests/torch \
    --ignore=tests/torch/test_torch_compile.py -k "cuda or docs"
part tests-cupy 60 "the tests on CuPy (VERA_BACKENDS=cupy)" -- \
    tests cupy "${xdist[@]}" "${collect[@]}" tests/core tests/array_backends -k cupy
part layer-eager 60 "one adapted layer, forward + backward, bf16, eager (ratios to the bare layer)" -- \
    "$PY" benchmarks/bench_torch_layer.py "${device[@]}" "${layer_sizes[@]}"
part layer-compiled 100 "one adapted layer under torch.compile(mode=\"reduce-overhead\"): CUDA graphs, no host time" -- \
    "$PY" benchmarks/bench_torch_layer.py "${device[@]}" "${layer_sizes[@]}" --compile reduce-overhead
part train-eager 75 "whole training step of the Llama-style model, bf16 weights, eager" -- \
    "$PY" benchmarks/bench_train_step.py "${device[@]}" "${step_size[@]}" --json "$results/train_step_eager.json"
if [ $dry = 0 ]; then
    many=(--adapters 10000 --train-adapters 1000)
else
    many=(--adapters 200 --train-adapters 50 --rows 16 --tokens 8 --repeats 2)
fi
part many-adapters 90 "many adapters on one GPT-2: adding, serving 256 rows of distinct adapters, training 1,000 at once" -- \
    "$PY" benchmarks/bench_many_adapters.py "${device[@]:0:2}" --parts add serve train "${many[@]}" \
    --json "$results/many_adapters.json"
tenants_backend=$([ $dry = 1 ] && echo numpy || echo cupy)  # a dry run has no CuPy: the same demo on NumPy
part tenants-cupy 90 "vera demo --tenants on CuPy: 1,000 users trained in one batched run" -- \
    bash -c '"$0" -m vera_cli demo --tenants --backend "$1" --no-progress --out /tmp/demo-tenants-cupy' "$PY" \
    "$tenants_backend"
part train-compiled 180 "whole training step under torch.compile(mode=\"reduce-overhead\"), checkpointing off" -- \
    "$PY" benchmarks/bench_train_step.py "${device[@]}" "${step_size[@]}" --compile reduce-overhead \
    --checkpointing off --json "$results/train_step_compiled.json"

say "## Summary ($((SECONDS - start)) s of the ${budget} s budget)"
say ""
say "| part | status | seconds |"
say "|---|---|---|"
for row in "${summary[@]}"; do
    say "$row"
done
exit $failed
