"""Memory of a Llama-style model with 4-bit (nf4) linear layers against the same model in bfloat16.

Builds the model from a ``LlamaConfig`` (nothing downloaded), counts the bytes of every
tensor it holds (parameters, buffers, and bitsandbytes' quantization statistics: block
scales, their nested scales and code tables), then quantizes every linear layer of the
decoder to nf4 with bitsandbytes (block size 64, nested statistics, bfloat16 compute:
the QLoRA recipe; embeddings and the output head stay bfloat16, as Hugging Face keeps
them) and counts again. Then adds VeRA on all-linear and counts its vectors and shared
projections. The counts are exact (what the weights occupy on any device); no timing.

Run::

    python benchmarks/bench_quantized_memory.py
    python benchmarks/bench_quantized_memory.py --layers 22  # TinyLlama-1.1B's shape (about 5 GB of RAM to build)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=256)
    return parser.parse_args()


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor the model holds, quantization statistics included."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor | None) -> None:
        if isinstance(t, torch.Tensor):
            seen[t.data_ptr()] = t.numel() * t.element_size()

    for tensor in (*model.parameters(), *model.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            add(state.absmax)
            add(getattr(state, "code", None))
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
    return sum(seen.values())


def quantize_linears(model: nn.Module) -> int:
    """Replace every nn.Linear under ``model.model.layers`` by an nf4 ``Linear4bit``; returns how many."""
    import bitsandbytes as bnb

    count = 0
    for layer in model.model.layers:
        for name, module in list(layer.named_modules()):
            if type(module) is not nn.Linear:
                continue
            quantized = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
            )
            quantized.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, quantized.to("cpu"))
            count += 1
    return count


def main() -> None:
    import transformers

    import vera_torch as vt

    args = parse_args()
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    linear_params = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, nn.Linear))
    dense = tensor_bytes(model)
    linears = quantize_linears(model)
    quantized = tensor_bytes(model)
    vt.add_vera(model, "all-linear", r=args.rank, seed=0)
    state = model.vera_state.projections
    projections = sum(t.numel() * t.element_size() for key in state.keys_by_name.values() for t in state.get(key))
    vectors = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    mib = 2**20
    print(
        f"Llama-style model: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"vocab {args.vocab}; {params / 1e6:.1f} M parameters, {linear_params / 1e6:.1f} M in {linears} decoder linears"
    )
    print()
    print("| | bytes | MiB | vs bfloat16 |")
    print("|:--|--:|--:|--:|")
    print(f"| bfloat16 model | {dense:,} | {dense / mib:.1f} | 1.00 |")
    print(
        f"| nf4 decoder linears (embeddings, head bf16) | {quantized:,} | {quantized / mib:.1f} | "
        f"{quantized / dense:.3f} |"
    )
    linear_dense = 2 * linear_params
    linear_quantized = quantized - (dense - linear_dense)
    print(f"| the decoder linears alone: bfloat16 | {linear_dense:,} | {linear_dense / mib:.1f} | 1.00 |")
    print(
        f"| the decoder linears alone: nf4 + statistics | {linear_quantized:,} | {linear_quantized / mib:.1f} | "
        f"{linear_quantized / linear_dense:.3f} |"
    )
    print(f"| VeRA r={args.rank} vectors (float32, trained) | {vectors:,} | {vectors / mib:.2f} | |")
    print(f"| VeRA shared projections (float32, regenerated) | {projections:,} | {projections / mib:.2f} | |")
    print()
    print(f"bits per decoder-linear weight with nf4: {8 * linear_quantized / linear_params:.3f}")


if __name__ == "__main__":
    main()
