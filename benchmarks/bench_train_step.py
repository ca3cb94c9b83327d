"""A whole training step of a small Llama-style model: vera_torch VeRA/DVoRA vs PEFT, in one run.

Usage::

    python benchmarks/bench_train_step.py --check          # first: does every variant train?
    python benchmarks/bench_train_step.py                  # CPU fp32, 2 threads, r=256
    python benchmarks/bench_train_step.py --device cuda --dtype bfloat16 --repeats 30
    python benchmarks/bench_train_step.py --device cuda --dtype bfloat16 --compile reduce-overhead
    python benchmarks/bench_train_step.py --autocast --json step.json   # bf16 autocast over fp32

The model is ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` (default: 8
decoder layers, hidden 256, MLP 688, 8 heads, vocabulary 4096; nothing is downloaded), with
every linear layer but the output head adapted (``"all-linear"``). One step is::

    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss      # under torch.autocast with --autocast
    loss.backward()
    optimizer.step()                                   # torch.optim.AdamW over the trainable parameters

on ``--batch`` x ``--seq`` tokens (default 1 x 512). Variants:

* ``vera``: ``vt.add_vera(model, "all-linear", r=R)``;
* ``peft-vera``: PEFT ``VeraConfig(r=R, target_modules="all-linear")``;
* ``peft-lora``: PEFT ``LoraConfig(r=16, target_modules="all-linear")``;
* ``dvora``: ``vt.add_vera(model, "all-linear", r=R, dvora=True)``;
* ``peft-dora``: PEFT ``LoraConfig(r=16, use_dora=True, target_modules="all-linear")``.

PEFT runs with its defaults (adapter weights float32 on a bfloat16 model, as ours). Every
variant is timed with and without activation checkpointing (``--checkpointing``), all of
them interleaved in one loop (A B C ... A B C ...) so that machine noise hits all alike.
Reported: median and best seconds per step, tokens per second (median), and ratios of the
median (and of the best) to PEFT VeRA, PEFT LoRA r=16 and PEFT DoRA r=16 measured in the
same run and the same checkpointing setting. On CUDA also the peak memory allocated during
the first two steps beyond what the model held before them (activations, gradients, the
optimizer's state; with ``--compile``, the compiler's and CUDA graphs' buffers too). Each
sample on CUDA is ``--inner`` steps between synchronisations.

Before timing, every model is checked: the trainable parameter count equals the count
computed from the bare model's linear layers (VeRA: out + r per layer; DVoRA: 2 out + r;
LoRA: r (in + out); DoRA: r (in + out) + out), and with checkpointing on, the decoder's
MLPs really run twice per step (the recomputation in backward). ``--check`` goes further and
times nothing: each variant trains ``--check-steps`` steps on one batch; the loss must fall,
every trainable parameter must move and every frozen one stay bit-identical, and the
gradients with checkpointing must match those without. It exits 1 when a check fails.

``--compile MODE`` runs each model through ``torch.compile(model, mode=MODE)`` (the
optimizer stays eager); the first steps compile, before any timing, and the table gives the
number of graph breaks ``torch._dynamo.explain`` finds in each variant's forward. With
``reduce-overhead`` on CUDA the forward and backward replay as CUDA graphs.

Activation checkpointing is transformers' own (``activation_checkpointing_enable``, or
``gradient_checkpointing_enable`` on older versions), non-reentrant, without the hook that
makes the embedding output require grad (only reentrant checkpointing needs it, and it breaks
a compiled graph).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src" / "backends"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import vera_torch as vt

VARIANTS = ("vera", "peft-vera", "peft-lora", "dvora", "peft-dora")
LABELS = {
    "vera": "vera_torch VeRA r={r}",
    "peft-vera": "PEFT VeRA r={r}",
    "peft-lora": "PEFT LoRA r={lora_r}",
    "dvora": "vera_torch DVoRA r={r}",
    "peft-dora": "PEFT DoRA r={lora_r}",
}
BASELINES = ("peft-vera", "peft-lora", "peft-dora")


@dataclass
class Case:
    """One model under test: a variant with checkpointing on or off."""

    variant: str
    checkpointing: bool
    model: nn.Module
    hf_model: nn.Module  # the transformers model inside (the same object for vera_torch)
    trainable: int
    expected: int
    step: Callable[[], torch.Tensor] = field(repr=False, default=lambda: torch.zeros(()))
    graph_breaks: int | None = None
    peak_mib: float | None = None
    first_steps_s: float | None = None

    @property
    def name(self) -> str:
        return f"{self.variant}{' +ckpt' if self.checkpointing else ''}"


def llama_config(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 64),
        tie_word_embeddings=False,
        use_cache=False,
    )


def adapted_linears(model: nn.Module) -> list[nn.Linear]:
    """The layers "all-linear" targets in a bare LlamaForCausalLM: every nn.Linear but lm_head."""
    head = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]


def expected_trainable(model: nn.Module, variant: str, r: int, lora_r: int) -> int:
    """Trainable parameters each method should add, from the bare model's layer sizes."""
    total = 0
    for layer in adapted_linears(model):
        n_in, n_out = layer.in_features, layer.out_features
        total += {
            "vera": n_out + r,
            "peft-vera": n_out + r,
            "dvora": 2 * n_out + r,
            "peft-lora": lora_r * (n_in + n_out),
            "peft-dora": lora_r * (n_in + n_out) + n_out,
        }[variant]
    return total


def build(variant: str, checkpointing: bool, args: argparse.Namespace, dtype: torch.dtype) -> Case:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(llama_config(args)).to(device=args.device, dtype=dtype)
    expected = expected_trainable(hf_model, variant, args.r, args.lora_r)
    model: nn.Module
    if variant in ("vera", "dvora"):
        model = vt.add_vera(hf_model, target_modules="all-linear", r=args.r, dvora=variant == "dvora")
    else:
        import peft

        if variant == "peft-vera":
            config: Any = peft.VeraConfig(r=args.r, target_modules="all-linear", save_projection=False)
        else:
            config = peft.LoraConfig(r=args.lora_r, target_modules="all-linear", use_dora=variant == "peft-dora")
        model = peft.get_peft_model(hf_model, config)
        model.to(args.device)
    if checkpointing:
        enable_checkpointing(hf_model)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Case(variant, checkpointing, model, hf_model, trainable, expected)


def enable_checkpointing(hf_model: nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (``gradient_checkpointing_enable`` on older versions).

    transformers also makes the embedding output require grad (a forward hook calling
    ``requires_grad_``), which only reentrant checkpointing needs and which breaks a compiled
    graph: that hook is removed. ``--check`` compares the gradients with those without
    checkpointing.
    """
    kwargs = {"use_reentrant": False}
    enable = getattr(hf_model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(hf_model, "_require_grads_hook"):
        hf_model.disable_input_require_grads()


def disable_checkpointing(hf_model: nn.Module) -> None:
    disable = getattr(hf_model, "activation_checkpointing_disable", None)
    if disable is not None:
        disable()
    else:
        hf_model.gradient_checkpointing_disable()


def autocast_context(device: str, on: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` when ``on`` (``--autocast``), else nothing."""
    return torch.autocast(device, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def make_step(case: Case, ids: torch.Tensor, args: argparse.Namespace, lr: float = 1e-3) -> Callable[[], torch.Tensor]:
    """One training step of ``case.model`` (compiled with ``--compile``); returns the loss."""
    params = [p for p in case.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    forward = case.model if args.compile is None else torch.compile(case.model, mode=args.compile)
    autocast = autocast_context(args.device, args.autocast)
    mark_step = args.compile == "reduce-overhead" and args.device == "cuda"

    def step() -> torch.Tensor:
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def recomputes(case: Case, ids: torch.Tensor, autocast: bool) -> int:
    """How many times the first decoder layer's MLP runs in one forward + backward (2: checkpointed).

    Counted by wrapping the module's ``forward`` (a forward hook would not see the
    recomputation: torch's checkpoint replays the function without module hooks).
    """
    mlp = case.hf_model.model.layers[0].mlp
    calls = 0
    forward = mlp.forward

    def counting(*inputs: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return forward(*inputs, **kwargs)

    mlp.forward = counting
    try:
        with autocast_context(ids.device.type, autocast):
            loss = case.model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        del mlp.forward  # the class's forward again
        case.model.zero_grad(set_to_none=True)
    return calls


def sanity(case: Case, ids: torch.Tensor, autocast: bool) -> list[str]:
    """Problems with a freshly built case: wrong trainable count, checkpointing not active."""
    problems = []
    if case.trainable != case.expected:
        problems.append(f"{case.name}: {case.trainable} trainable parameters, expected {case.expected}")
    calls = recomputes(case, ids, autocast)
    if calls != (2 if case.checkpointing else 1):
        state = "on" if case.checkpointing else "off"
        problems.append(f"{case.name}: checkpointing {state} but the MLP ran {calls} time(s) in one step")
    return problems


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_round_robin(cases: list[Case], device: str, warmup: int, repeats: int, inner: int) -> dict[str, list[float]]:
    """Seconds per step of each case, the cases taking turns (A B C ... A B C ...)."""
    for _ in range(warmup):
        for case in cases:
            case.step()
    _sync(device)
    times: dict[str, list[float]] = {case.name: [] for case in cases}
    for _ in range(repeats):
        for case in cases:
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                case.step()
            _sync(device)
            times[case.name].append((time.perf_counter() - start) / inner)
    return times


def count_graph_breaks(case: Case, ids: torch.Tensor, autocast: bool) -> int:
    """Graph breaks Dynamo finds in the forward (``torch._dynamo.explain``; it resets Dynamo's caches)."""
    with autocast_context(ids.device.type, autocast):
        explained = torch._dynamo.explain(case.model)(input_ids=ids, labels=ids)
    case.model.zero_grad(set_to_none=True)
    return explained.graph_break_count


def first_step(case: Case, device: str) -> None:
    """Run two steps (compiling them with --compile), timing them and measuring the CUDA peak."""
    start = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    case.step()
    case.step()  # the optimizer allocates its state on the first step
    if device == "cuda":
        torch.cuda.synchronize()
        case.peak_mib = (torch.cuda.max_memory_allocated() - held) / 2**20
    case.first_steps_s = time.perf_counter() - start


def check_training(args: argparse.Namespace, dtype: torch.dtype, ids: torch.Tensor) -> bool:
    """--check: every variant trains what it should. Prints a table; True when all pass."""
    columns = ["variant", "trainable", "expected", "loss at step 0", f"loss after {args.check_steps - 1} steps"]
    columns += ["trainable moved", "frozen unchanged", "MLP runs per step with ckpt", "grads with ckpt vs without"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    ok = True
    for variant in args.variants:
        case = build(variant, False, args, dtype)
        problems = sanity(case, ids, args.autocast)
        # gradients with and without checkpointing from the same state (non-trivial vectors first)
        gradient_match, ckpt_runs = _checkpointing_gradients(case, ids, args)
        frozen = {n: p.detach().clone() for n, p in case.model.named_parameters() if not p.requires_grad}
        start = {n: p.detach().clone() for n, p in case.model.named_parameters() if p.requires_grad}
        step = make_step(case, ids, args, lr=args.check_lr)
        losses = [float(step()) for _ in range(args.check_steps)]
        params = dict(case.model.named_parameters())
        moved = sum(not torch.equal(params[n].detach(), v) for n, v in start.items())
        unchanged = all(torch.equal(params[n].detach(), v) for n, v in frozen.items())
        falls = losses[-1] < losses[0] - 1e-3
        passed = not problems and falls and moved == len(start) and unchanged and gradient_match and ckpt_runs == 2
        ok &= passed
        cells = [label(variant, args), f"{case.trainable:,}", f"{case.expected:,}", f"{losses[0]:.4f}"]
        cells += [f"{losses[-1]:.4f}" + ("" if falls else " **did not fall**"), f"{moved}/{len(start)} tensors"]
        cells += ["yes" if unchanged else "**no**", str(ckpt_runs), "match" if gradient_match else "**differ**"]
        print("| " + " | ".join(cells) + " |", flush=True)
        for problem in problems:
            print(f"  problem: {problem}")
    return ok


def _checkpointing_gradients(case: Case, ids: torch.Tensor, args: argparse.Namespace) -> tuple[bool, int]:
    """Gradients of one step without, then with checkpointing (same weights): (close?, MLP runs with)."""
    state = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    with torch.no_grad():  # move the zero-initialised vectors so that every gradient is non-trivial
        generator = torch.Generator(device="cpu").manual_seed(1)
        for p in case.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p))

    def grads() -> dict[str, torch.Tensor]:
        with autocast_context(args.device, args.autocast):
            loss = case.model(input_ids=ids, labels=ids).loss
        loss.backward()
        out = {n: p.grad.detach().float().clone() for n, p in case.model.named_parameters() if p.grad is not None}
        case.model.zero_grad(set_to_none=True)
        return out

    plain = grads()
    enable_checkpointing(case.hf_model)
    checkpointed = Case(case.variant, True, case.model, case.hf_model, case.trainable, case.expected)
    runs = recomputes(checkpointed, ids, args.autocast)
    with_ckpt = grads()
    disable_checkpointing(case.hf_model)
    with torch.no_grad():
        for n, p in case.model.named_parameters():
            p.copy_(state[n])
    tol = 1e-4 if args.dtype == "float32" and not args.autocast else 5e-2
    trainable_tensors = sum(1 for p in case.model.parameters() if p.requires_grad)
    same = plain.keys() == with_ckpt.keys() and len(plain) == trainable_tensors
    same = same and all(
        torch.allclose(with_ckpt[n], g, rtol=tol, atol=tol * float(g.abs().max())) for n, g in plain.items()
    )
    return same, runs


def label(variant: str, args: argparse.Namespace) -> str:
    return LABELS[variant].format(r=args.r, lora_r=args.lora_r)


def ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


def print_table(cases: list[Case], times: dict[str, list[float]], tokens: int, args: argparse.Namespace) -> list[dict]:
    cuda = args.device == "cuda"
    compiled = args.compile is not None
    columns = ["checkpointing", "variant", "trainable", "median ms", "best ms", "tokens/s"]
    columns += [f"vs {label(b, args)} (median / best)" for b in BASELINES]
    columns += ["CUDA peak MiB"] * cuda + ["graph breaks", "first 2 steps s (compiling)"] * compiled
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    rows = []
    for case in cases:
        median, best = statistics.median(times[case.name]), min(times[case.name])
        base = {
            b: (statistics.median(times[n]), min(times[n]))
            for b in BASELINES
            if (n := b + (" +ckpt" if case.checkpointing else "")) in times
        }
        cells = []
        for b in BASELINES:
            if b == case.variant or b not in base:
                cells.append("-")
            else:
                cells.append(f"{ratio(median, base[b][0])} / {ratio(best, base[b][1])}")
        name = label(case.variant, args)
        first = ["on" if case.checkpointing else "off", f"**{name}**" if case.variant in ("vera", "dvora") else name]
        first += [f"{case.trainable:,}", f"{median * 1e3:.1f}", f"{best * 1e3:.1f}", f"{tokens / median:,.0f}"]
        last = [f"{case.peak_mib:.0f}"] if cuda else []
        last += [str(case.graph_breaks), f"{case.first_steps_s:.1f}"] if compiled else []
        print("| " + " | ".join(first + cells + last) + " |", flush=True)
        rows.append(
            {
                "variant": case.variant,
                "checkpointing": case.checkpointing,
                "trainable": case.trainable,
                "median_s": median,
                "best_s": best,
                "tokens_per_s": tokens / median,
                "samples_s": times[case.name],
                "ratios_median": {b: median / base[b][0] for b in base if b != case.variant},
                "ratios_best": {b: best / base[b][1] for b in base if b != case.variant},
                "cuda_peak_mib": case.peak_mib,
                "graph_breaks": case.graph_breaks,
                "first_steps_s": case.first_steps_s,
            }
        )
    print("\nvs X: this variant's median (and best) step time over X's, same checkpointing setting; below 1: faster.")
    return rows


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (a temporary file in the same folder, then rename)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=1)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights")
    parser.add_argument("--autocast", action="store_true", help="forward under torch.autocast(bfloat16)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=None, help="steps per timed sample (default: 5 CUDA, 1 CPU)")
    parser.add_argument("--r", type=int, default=256, help="VeRA/DVoRA rank (ours and PEFT VeRA)")
    parser.add_argument("--lora-r", type=int, default=16, help="PEFT LoRA/DoRA rank")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--checkpointing", default="both", choices=["off", "on", "both"])
    parser.add_argument(
        "--compile",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile(model, mode=MODE) for every variant (reduce-overhead: CUDA graphs on CUDA)",
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--json", metavar="OUT", default=None, help="also write every number to this JSON file")
    parser.add_argument("--check", action="store_true", help="check that every variant trains; time nothing")
    parser.add_argument("--check-steps", type=int, default=6)
    parser.add_argument("--check-lr", type=float, default=1e-2)
    args = parser.parse_args(argv)
    if args.autocast and args.dtype != "float32":
        parser.error("--autocast runs bfloat16 autocast over a float32 model: use it with --dtype float32")
    for name in ("threads", "repeats", "r", "lora_r", "layers", "hidden", "intermediate", "heads", "vocab", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.seq < 2 or args.warmup < 0 or args.check_steps < 2:
        parser.error("--seq and --check-steps must be at least 2 and --warmup at least 0")
    if args.hidden % args.heads:
        parser.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # PEFT's advice to store the projections, and transformers' renaming notices, on every build
    warnings.filterwarnings("ignore", message="Specified to not save vera_A and vera_B")
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
        dropped = [v for v in args.variants if v.startswith("peft")]
        args.variants = [v for v in args.variants if not v.startswith("peft")]
        print(f"# peft is not installed: {', '.join(dropped)} skipped")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    precision = args.dtype + (" weights, bfloat16 autocast" if args.autocast else " weights")
    tokens = args.batch * args.seq
    print(
        f"# Llama-style model: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, "
        f"{args.heads} heads, vocab {args.vocab}; {args.batch} x {args.seq} = {tokens} tokens per step; "
        f"all-linear adapters; AdamW\n"
        f"# torch {torch.__version__}, transformers {transformers.__version__}, peft {peft_version}; "
        f"{args.device} ({where}), {precision}, threads={torch.get_num_threads()}"
        + ("" if args.compile is None else f", torch.compile(mode={args.compile!r})")
    )
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    if args.check:
        ok = check_training(args, dtype, ids)
        print("\ncheck: " + ("every variant trains what it should" if ok else "FAILED (see the rows above)"))
        return 0 if ok else 1

    settings = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    cases, problems = [], []
    for checkpointing in settings:
        for variant in args.variants:
            case = build(variant, checkpointing, args, dtype)
            problems += sanity(case, ids, args.autocast)
            if args.compile is not None:
                case.graph_breaks = count_graph_breaks(case, ids, args.autocast)
            cases.append(case)
    torch._dynamo.reset()
    # The models share transformers' code objects, each adding guards to the same frames: Dynamo's
    # default of 8 versions per frame would send the later variants back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(cases))
    for case in cases:
        case.step = make_step(case, ids, args)
        first_step(case, args.device)
    for problem in problems:
        print(f"# PROBLEM: {problem}")
    inner = args.inner or (5 if args.device == "cuda" else 1)
    print(f"# {args.repeats} interleaved samples of {inner} step(s) each after {args.warmup} warm-up rounds")
    load = os.getloadavg()
    times = time_round_robin(cases, args.device, args.warmup, args.repeats, inner)
    load_after = os.getloadavg()
    print(f"# load average (1 min) before / after timing: {load[0]:.1f} / {load_after[0]:.1f}, {os.cpu_count()} CPUs\n")
    rows = print_table(cases, times, tokens, args)
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        meta.update(torch=torch.__version__, transformers=transformers.__version__, peft=peft_version, where=where)
        write_json(args.json, {"meta": meta, "problems": problems, "rows": rows})
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
