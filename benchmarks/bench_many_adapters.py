"""Many adapters on one base: adding, loading, serving and training thousands (vera_torch's bank).

Usage::

    python benchmarks/bench_many_adapters.py                      # every part, CPU, 1 thread
    python benchmarks/bench_many_adapters.py --parts add serve --adapters 10000
    python benchmarks/bench_many_adapters.py --device cuda --parts serve train

The model is issue 13's tiny GPT-2 (4 layers, n_embd 128, targets ``c_attn``/``c_proj``/
``c_fc``, r=64), built from a config (nothing downloaded). Parts:

* ``add``: ``vt.add_vera(..., adapter_name=...)`` N times: total, and the cost per adapter of
  the first and the last 100 (flat means linear in N); resident bytes per adapter against
  its vectors' bytes;
* ``load``: N adapter files written, then loaded into a bare model with ``vt.load_adapters``;
* ``serve``: a no-grad forward of ``--rows`` rows, each from a different adapter (N
  resident), against the same batch through one adapter, through the per-row path with one
  adapter, and through the base model (interleaved; median of ``--repeats``);
* ``train``: a training step (forward, backward, ``BankAdamW``) whose rows come from
  ``--train-adapters`` different adapters, against the same step with one adapter (on its
  merged-weight path, and on the per-row path that mixed batches take);
* ``peft``: PEFT LoRA r=16 side by side for N up to ``--peft-adapters`` (while it takes under
  two minutes): the time to add N adapters, and a mixed batch at 1, 32 and 256 distinct
  adapters (PEFT's ``adapter_names``) against vera_torch's.

Ratios are within one run, the variants interleaved; the figures go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src" / "backends"))

import vera_torch as vt

TARGETS = ["c_attn", "c_proj", "c_fc"]
PARTS = ("add", "load", "serve", "train", "peft")


def gpt2(device: str) -> torch.nn.Module:
    """Issue 13's tiny GPT-2, from a config."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=1000, n_positions=128)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(device)


def names(count: int) -> list[str]:
    return [f"user{i}" for i in range(count)]


def add_many(model: torch.nn.Module, count: int, rank: int) -> list[float]:
    """Add ``count`` adapters; returns the cumulative time after each."""
    marks, start = [], time.perf_counter()
    for name in names(count):
        vt.add_vera(model, TARGETS, r=rank, adapter_name=name)
        marks.append(time.perf_counter() - start)
    return marks


def randomize(model: torch.nn.Module) -> None:
    """Trained-looking vectors in every bank row (lambda_b starts at zero)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in vt.vera_layers(model).values():
            for bank in layer.banks():
                for param in (bank.lambda_d, bank.lambda_b):
                    param.copy_(torch.randn(param.shape, generator=generator).to(param.device) * 0.1)


def resident_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes the banks hold, bytes of the adapters' own vectors)."""
    held = sum(
        p.numel() * p.element_size()
        for layer in vt.vera_layers(model).values()
        for bank in layer.banks()
        for p in bank.parameters_by_kind().values()
    )
    own = sum(vt.trainable_parameters(model).by_adapter.values()) * 4
    return held, own


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each variant, run A B C A B C ... after one warm-up each."""
    for run in variants.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def part_add(args: argparse.Namespace) -> dict[str, Any]:
    model = gpt2(args.device)
    marks = add_many(model, args.adapters, args.rank)
    first = marks[99] / 100 if len(marks) >= 100 else marks[-1] / len(marks)
    last = (marks[-1] - marks[-101]) / 100 if len(marks) > 100 else first
    held, own = resident_bytes(model)
    return {
        "adapters": args.adapters,
        "total_s": marks[-1],
        "first_100_ms_each": 1e3 * first,
        "last_100_ms_each": 1e3 * last,
        "last_over_first": last / first,
        "resident_over_vectors": held / own,
        "vector_bytes_per_adapter": own / args.adapters,
    }


def part_load(args: argparse.Namespace) -> dict[str, Any]:
    donor = gpt2("cpu")
    vt.add_vera(donor, TARGETS, r=args.rank, adapter_name="donor")
    randomize(donor)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        for name in names(args.adapters):
            vt.save_adapter(donor, Path(folder) / f"{name}.safetensors", "donor")
        written = time.perf_counter() - start
        model = gpt2(args.device)
        start = time.perf_counter()
        vt.load_adapters(model, folder)
        loaded = time.perf_counter() - start
    return {
        "adapters": args.adapters,
        "write_s": written,
        "load_s": loaded,
        "per_file_ms": 1e3 * loaded / args.adapters,
    }


def part_serve(args: argparse.Namespace) -> dict[str, Any]:
    model = gpt2(args.device).eval()
    add_many(model, args.adapters, args.rank)
    randomize(model)
    ids = torch.randint(0, 1000, (args.rows, args.tokens), device=args.device)
    everyone = vt.adapter_index(model, names(args.adapters)[: args.rows])
    one = vt.adapter_index(model, ["user0"] * args.rows)
    vt.set_adapter(model, "user0")

    def forward(**kwargs: Any) -> Callable[[], Any]:
        def run() -> None:
            with torch.no_grad():
                model(ids, **kwargs)

        return run

    def base() -> None:
        with torch.no_grad(), vt.disable_adapters(model):
            model(ids)

    times = interleaved(
        {
            "distinct": forward(adapter_names=everyone),
            "one_adapter_per_row_path": forward(adapter_names=one),
            "one_adapter": forward(),
            "base": base,
        },
        args.repeats,
        args.device,
    )
    return (
        {"adapters_resident": args.adapters, "rows": args.rows, "tokens_per_row": args.tokens}
        | {f"{name}_ms": 1e3 * value for name, value in times.items()}
        | {
            "distinct_over_one_adapter": times["distinct"] / times["one_adapter"],
            "distinct_over_per_row_one_adapter": times["distinct"] / times["one_adapter_per_row_path"],
            "distinct_over_base": times["distinct"] / times["base"],
        }
    )


def part_train(args: argparse.Namespace) -> dict[str, Any]:
    base = gpt2(args.device)
    many = copy.deepcopy(base)
    everyone = names(args.train_adapters)
    add_many(many, args.train_adapters, args.rank)
    vt.set_adapter(many, everyone)
    single = copy.deepcopy(base)
    vt.add_vera(single, TARGETS, r=args.rank, adapter_name="user0")
    ids = torch.randint(0, 1000, (args.rows, args.tokens), device=args.device)
    picks = torch.randint(0, args.train_adapters, (args.rows,), generator=torch.Generator().manual_seed(1))
    rows = vt.adapter_index(many, [everyone[int(i)] for i in picks])
    opt_many = vt.BankAdamW([p for p in many.parameters() if p.requires_grad], lr=1e-3)
    opt_single = vt.BankAdamW([p for p in single.parameters() if p.requires_grad], lr=1e-3)

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, **kwargs: Any) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad()
            model(ids, labels=ids, **kwargs).loss.backward()
            opt.step()

        return run

    one_row_path = vt.adapter_index(single, ["user0"] * args.rows)
    times = interleaved(
        {
            "distinct": step(many, opt_many, adapter_names=rows),
            "one_adapter": step(single, opt_single),
            "one_adapter_per_row_path": step(single, opt_single, adapter_names=one_row_path),
        },
        args.repeats,
        args.device,
    )
    return {
        "adapters": args.train_adapters,
        "distinct_in_batch": int(torch.unique(picks).numel()),
        "rows": args.rows,
        "tokens_per_row": args.tokens,
        "distinct_ms": 1e3 * times["distinct"],
        "one_adapter_ms": 1e3 * times["one_adapter"],
        "one_adapter_per_row_path_ms": 1e3 * times["one_adapter_per_row_path"],
        "distinct_over_one_adapter": times["distinct"] / times["one_adapter"],
        "distinct_over_per_row_one_adapter": times["distinct"] / times["one_adapter_per_row_path"],
    }


def part_peft(args: argparse.Namespace) -> dict[str, Any]:
    import peft

    out: dict[str, Any] = {}
    count = args.peft_adapters
    model = peft.get_peft_model(gpt2(args.device), peft.LoraConfig(r=16, target_modules=TARGETS, fan_in_fan_out=True))
    start = time.perf_counter()
    for name in names(count)[1:]:
        model.add_adapter(name, peft.LoraConfig(r=16, target_modules=TARGETS, fan_in_fan_out=True))
        if time.perf_counter() - start > 120:
            count = len(model.peft_config)
            break
    out["peft_lora_adapters"] = count
    out["peft_lora_add_s"] = time.perf_counter() - start
    ours = gpt2(args.device).eval()
    start = time.perf_counter()
    add_many(ours, count, args.rank)
    out["vera_add_s"] = time.perf_counter() - start
    model.eval()
    randomize(ours)
    ids = torch.randint(0, 1000, (256, args.tokens), device=args.device)
    for distinct in (1, 32, 256):
        chosen = [["default", *names(count)[1:]][i % min(distinct, count)] for i in range(256)]
        ours_rows = vt.adapter_index(ours, [name if name != "default" else "user0" for name in chosen])

        def run_peft(chosen: list[str] = chosen) -> None:
            with torch.no_grad():
                model(ids, adapter_names=chosen)

        def run_ours(rows: torch.Tensor = ours_rows) -> None:
            with torch.no_grad():
                ours(ids, adapter_names=rows)

        times = interleaved({"peft": run_peft, "vera": run_ours}, args.repeats, args.device)
        out[f"mixed_{distinct}_peft_lora_ms"] = 1e3 * times["peft"]
        out[f"mixed_{distinct}_vera_ms"] = 1e3 * times["vera"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adapters", type=int, default=10_000, help="adapters added, loaded or resident")
    parser.add_argument("--train-adapters", type=int, default=1_000)
    parser.add_argument("--peft-adapters", type=int, default=400)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": args.threads,
    }
    for part in args.parts:
        results[part] = globals()[f"part_{part}"](args)
        print(f"## {part}")
        for key, value in results[part].items():
            print(f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}")
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
