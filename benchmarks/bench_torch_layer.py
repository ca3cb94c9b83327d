"""One adapted layer, forward + backward: bare frozen Linear vs vera_torch vs PEFT, in one run.

Usage::

    python benchmarks/bench_torch_layer.py                 # CPU fp32, 2 threads, both sizes
    python benchmarks/bench_torch_layer.py --sizes 2048x1024x1024 --repeats 15
    python benchmarks/bench_torch_layer.py --device cuda --dtype bfloat16 --repeats 20

Each variant runs ``y = layer(x); y.backward(g)`` with ``x.requires_grad`` (a layer in the
middle of a network) and the base weight frozen. Reported: median and best time over
``--repeats`` after ``--warmup`` runs (the variants interleaved, so machine noise hits all
alike), the ratios to the bare layer, and the activation memory:

* CPU: bytes of the tensors autograd saves for backward (``saved_tensors_hooks``),
  counted once per storage, weights, other parameters/buffers and the shared
  projections excluded (the input ``x``, saved by the frozen Linear, is counted);
* CUDA: ``torch.cuda.max_memory_allocated`` during forward+backward minus the memory
  held before (weights, projections and inputs), i.e. activations plus temporaries.

Variants: ``bare`` (frozen ``nn.Linear``), ``vera`` (vera_torch, r=256), ``peft-vera``
(PEFT ``VeraConfig(r=256)``), ``dvora`` (vera_torch DVoRA, r=256), ``peft-dora``
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

VARIANTS = ("bare", "vera", "peft-vera", "dvora", "peft-dora")


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
    if variant in ("vera", "dvora"):
        vt.add_vera(model, ["fc"], r=r, dvora=variant == "dvora")
    else:
        try:
            import peft
        except ImportError:
            return None
        if variant == "peft-vera":
            config = peft.VeraConfig(r=r, target_modules=["fc"], save_projection=False)
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


def make_step(model: nn.Module, tokens: int, n_in: int, n_out: int, device: str, dtype: torch.dtype):
    """A closure running forward + backward once, and its input (for the memory count)."""
    x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, n_out, device=device, dtype=dtype)
    autocast = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step() -> torch.Tensor:
        with autocast:
            y = model(x)
        y.backward(g)
        x.grad = None
        for p in model.parameters():
            p.grad = None
        return y

    return step, x


def activation_mib(model: nn.Module, step: Callable[[], torch.Tensor], device: str) -> float:
    """Activation memory of one forward + backward (see the module docstring)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        _sync(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    state = getattr(model, "vera_state", None)
    if state is not None:
        for key in state.projections.keys_by_name.values():
            exclude.update(t.untyped_storage().data_ptr() for t in state.projections.get(key))
    return _saved_bytes(step, exclude) / 2**20


def time_round_robin(
    steps: dict[str, Callable[[], torch.Tensor]], device: str, warmup: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """(median, best) seconds per variant, interleaved so that machine noise hits all alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


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
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    print(f"# torch {torch.__version__}, {args.device} ({where}), {args.dtype}, threads={torch.get_num_threads()}")
    print("| tokens x in x out | variant | median ms | vs bare | best ms | vs bare | activation MiB | extra vs bare |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        tokens, n_in, n_out = (int(v) for v in size.split("x"))
        models, steps, memory = {}, {}, {}
        for variant in args.variants:
            model = build(variant, n_in, n_out, args.rank, args.device, dtype)
            if model is None:
                print(f"| {size} | {variant} | skipped (peft not installed) | | | |")
                continue
            models[variant] = model
            steps[variant], _ = make_step(model, tokens, n_in, n_out, args.device, dtype)
            memory[variant] = activation_mib(model, steps[variant], args.device)
        seconds = time_round_robin(steps, args.device, args.warmup, args.repeats)
        bare_median, bare_best = seconds.get("bare", (None, None))
        bare_mem = memory.get("bare")
        for variant, (median, best) in seconds.items():
            ratio = f"{median / bare_median:.2f}x" if bare_median else ""
            best_ratio = f"{best / bare_best:.2f}x" if bare_best else ""
            extra = f"{memory[variant] - bare_mem:.1f}" if bare_mem is not None else ""
            print(
                f"| {size} | {variant} | {median * 1e3:.1f} | {ratio} | {best * 1e3:.1f} | {best_ratio} "
                f"| {memory[variant]:.1f} | {extra} |",
                flush=True,
            )
        tokens_r = tokens * args.rank * torch.finfo(dtype).bits / 8 / 2**20
        print(f"| {size} | (tokens x r allowance) | | | | | | {tokens_r:.1f} |", flush=True)
        del models, steps


if __name__ == "__main__":
    main()
