"""One adapted layer, forward + backward: bare frozen Linear vs vera_torch vs PEFT, in one run.

Usage::

    python benchmarks/bench_torch_layer.py                 # CPU fp32, 2 threads, both sizes
    python benchmarks/bench_torch_layer.py --sizes 2048x1024x1024 --repeats 15
    python benchmarks/bench_torch_layer.py --device cuda --dtype bfloat16 --repeats 20

Each variant runs ``y = layer(x); y.backward(g)`` with ``x.requires_grad`` (a layer in the
middle of a network) and the base weight frozen. Reported: median and best time over
``--repeats`` after ``--warmup`` runs (the variants interleaved, so machine noise hits all
alike), the ratios to the bare layer, and the activation memory:

* saved: bytes of the tensors autograd saves for backward (``saved_tensors_hooks``),
  counted once per storage, weights, other parameters/buffers and the shared
  projections excluded (the input ``x``, saved by the frozen Linear, is counted):
  what a layer in a deep network holds from its forward until its backward;
* CUDA peak: ``torch.cuda.max_memory_allocated`` during forward+backward minus the
  memory held before (weights, projections and inputs), i.e. output, input gradient,
  saved tensors and temporaries;
* ops: the ATen operators one step dispatches (``TorchDispatchMode``; views included),
  the same on every machine. On a GPU each is a launch the host pays for, so where the
  kernels are short the host, not the GPU, sets the pace: run tiny sizes
  (``--sizes 64x32x32 --rank 8``) for the host time per step.

On CUDA each timed sample runs ``--inner`` steps back to back between synchronisations
(as in training, where the host queues work ahead of the GPU) and reports the time per step.
The CUDA table also gives the GPU kernel time per step (torch.profiler), which leaves
out the host's dispatch overhead: where the host is the bottleneck, the wall-clock time
exceeds it. ``--profile VARIANT ...`` prints the CUDA kernels of one step of each (torch.profiler).
``--compile MODE`` runs every variant through ``torch.compile`` (``reduce-overhead`` replays
the step as a CUDA graph, which takes the host out of the loop); the first warm-up steps
compile.

Variants: ``bare`` (frozen ``nn.Linear``), ``vera`` (vera_torch, r=256), ``peft-vera``
(PEFT ``VeraConfig(r=256)``), ``peft-lora`` (PEFT ``LoraConfig(r=16)``), ``dvora`` (vera_torch
DVoRA, r=256, exact norm gradient),
``dvora-detached`` (the norm a constant in backward, DoRA section 4.3, as PEFT's DoRA), ``peft-dora``
(PEFT ``LoraConfig(r=16, use_dora=True)``). PEFT variants are skipped when peft is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src" / "backends"))

import vera_torch as vt

VARIANTS = ("bare", "vera", "peft-vera", "peft-lora", "dvora", "dvora-detached", "peft-dora")


class Holder(nn.Module):
    """A one-layer model, so that PEFT and vera_torch can target ``fc``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def build(variant: str, n_in: int, n_out: int, r: int, device: str, dtype: torch.dtype) -> nn.Module | None:
    torch.manual_seed(0)
    model = Holder(n_in, n_out).to(device=device, dtype=dtype)
    if variant == "bare":
        model.requires_grad_(False)
        return model
    if variant in ("vera", "dvora", "dvora-detached"):
        vt.add_vera(model, ["fc"], r=r, dvora=variant != "vera", detach_norm=variant == "dvora-detached")
    else:
        try:
            import peft
        except ImportError:
            return None
        if variant == "peft-vera":
            config = peft.VeraConfig(r=r, target_modules=["fc"], save_projection=False)
        elif variant == "peft-lora":
            config = peft.LoraConfig(r=16, target_modules=["fc"])
        else:
            config = peft.LoraConfig(r=16, target_modules=["fc"], use_dora=True)
        model = peft.get_peft_model(model, config).to(device)
        if dtype != torch.float32:
            model = model.to(dtype)  # PEFT keeps adapters float32 unless told
    with torch.no_grad():  # non-trivial vectors, as after some training
        for name, param in model.named_parameters():
            if param.requires_grad and ("lambda" in name or "lora_B" in name):
                param.normal_(0, 0.1)
    return model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _saved_bytes(step: Callable[[], torch.Tensor], exclude: set[int]) -> int:
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in exclude:
            storages[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def make_step(
    model: nn.Module, tokens: int, n_in: int, n_out: int, device: str, dtype: torch.dtype, compile_mode: str | None
):
    """A closure running forward + backward once (through ``torch.compile`` with a mode), and its input."""
    x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, n_out, device=device, dtype=dtype)
    autocast = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    forward = model if compile_mode is None else torch.compile(model, mode=compile_mode)
    params = list(model.parameters())  # held once, as an optimizer holds them (no module walk per step)

    def step() -> torch.Tensor:
        with autocast:
            y = forward(x)
        y.backward(g)
        x.grad = None
        for p in params:
            p.grad = None
        return y

    return step, x


def saved_mib(model: nn.Module, step: Callable[[], torch.Tensor]) -> float:
    """MiB autograd saves for backward in one step (see the module docstring)."""
    step()  # first: the projections' casts to the compute dtype are cached (held once per model)
    exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    state = getattr(model, "vera_state", None)
    if state is not None:  # the shared projections and their cached casts are held once per model
        for key in state.projections.keys_by_name.values():
            exclude.update(t.untyped_storage().data_ptr() for t in state.projections.get(key))
        exclude.update(t.untyped_storage().data_ptr() for pair in state.projections._cast_cache.values() for t in pair)
    return _saved_bytes(step, exclude) / 2**20


def ops_per_step(step: Callable[[], torch.Tensor]) -> int:
    """ATen operators dispatched by one step (forward, backward, clearing the gradients)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.calls


def peak_mib(step: Callable[[], torch.Tensor]) -> float:
    """CUDA: peak MiB allocated during one step beyond what was held before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def time_round_robin(
    steps: dict[str, Callable[[], torch.Tensor]], device: str, warmup: int, repeats: int, inner: int
) -> dict[str, tuple[float, float]]:
    """(median, best) seconds per step of each variant, interleaved so that noise hits all alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                step()
            _sync(device)
            times[name].append((time.perf_counter() - start) / inner)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


def kernel_ms(step: Callable[[], torch.Tensor], steps: int = 5) -> float:
    """CUDA: milliseconds of GPU kernels (and device copies) per step, host overhead excluded."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / steps / 1e3


def profile(step: Callable[[], torch.Tensor], rows: int = 25) -> None:
    """Print the CUDA kernels of one step, most time first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sizes", nargs="+", default=["2048x1024x1024", "8192x4096x4096"], help="TOKENSxINxOUT")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--inner", type=int, default=None, help="steps per timed sample (default: 10 CUDA, 1 CPU)")
    parser.add_argument("--profile", nargs="+", choices=VARIANTS, default=[], help="print one step's CUDA kernels")
    parser.add_argument(
        "--compile",
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        default=None,
        help="run every variant through torch.compile with this mode (reduce-overhead: CUDA graphs); "
        "the saved-memory and ops columns are then not measured",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    print(
        f"# torch {torch.__version__}, {args.device} ({where}), {args.dtype}, threads={torch.get_num_threads()}"
        + ("" if args.compile is None else f", torch.compile(mode={args.compile!r})")
    )
    inner = args.inner or (10 if args.device == "cuda" else 1)
    cuda = args.device == "cuda"
    print(
        "| tokens x in x out | variant | median ms | vs bare | best ms | vs bare | ops | saved MiB | extra vs bare |"
        + (" CUDA peak MiB | extra vs bare | GPU kernel ms | vs bare |" if cuda else "")
    )
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if cuda else ""))
    for size in args.sizes:
        tokens, n_in, n_out = (int(v) for v in size.split("x"))
        models, steps, saved, peak, kernels, ops = {}, {}, {}, {}, {}, {}
        for variant in args.variants:
            model = build(variant, n_in, n_out, args.rank, args.device, dtype)
            if model is None:
                print(f"| {size} | {variant} | skipped (peft not installed) | | | | | | |")
                continue
            models[variant] = model
            steps[variant], _ = make_step(model, tokens, n_in, n_out, args.device, dtype, args.compile)
            if args.compile is None:  # hooks and dispatch modes would see the compiled graph, not the layer
                saved[variant] = saved_mib(model, steps[variant])
                ops[variant] = ops_per_step(steps[variant])
            if cuda:
                peak[variant] = peak_mib(steps[variant])
                kernels[variant] = kernel_ms(steps[variant])
        seconds = time_round_robin(steps, args.device, args.warmup, args.repeats, inner)
        bare_median, bare_best = seconds.get("bare", (None, None))
        for variant, (median, best) in seconds.items():
            ratio = f"{median / bare_median:.2f}x" if bare_median else ""
            best_ratio = f"{best / bare_best:.2f}x" if bare_best else ""
            row = f"| {size} | {variant} | {median * 1e3:.3f} | {ratio} | {best * 1e3:.3f} | {best_ratio} "
            row += f"| {ops.get(variant, '-')} | {_mib(saved, variant)} | {_extra(saved, variant)} |"
            if cuda:
                row += f" {peak[variant]:.1f} | {_extra(peak, variant)} | {kernels[variant]:.3f} |"
                row += f" {kernels[variant] / kernels['bare']:.2f}x |" if "bare" in kernels else " |"
            print(row, flush=True)
        tokens_r = tokens * args.rank * torch.finfo(dtype).bits / 8 / 2**20
        allowance = f"| {size} | (tokens x r allowance) | | | | | | | {tokens_r:.1f} |"
        print(allowance + (" | | | |" if cuda else ""), flush=True)
        for variant in args.profile:
            if variant in steps:
                print(f"\n### {size} {variant}: CUDA kernels of one step\n")
                profile(steps[variant])
        del models, steps


def _mib(mib: dict[str, float], variant: str) -> str:
    return f"{mib[variant]:.1f}" if variant in mib else "-"


def _extra(mib: dict[str, float], variant: str) -> str:
    return f"{mib[variant] - mib['bare']:.1f}" if variant in mib and "bare" in mib else ""


if __name__ == "__main__":
    main()
