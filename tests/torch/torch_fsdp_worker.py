"""The per-process body of the FSDP2 tests (a module of its own so that spawn can import it).

One spawn of two gloo processes runs every scenario and rank 0 saves what the tests check
(``results.pt`` and the adapter files); the tests build the one-process references with
the same functions.
"""

from __future__ import annotations

import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")  # also skips --doctest-modules collection without torch
transformers = pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch_helpers import randomize_vectors  # noqa: E402

import vera_torch as vt  # noqa: E402

METHODS = ("vera", "dvora")
GLOBAL_BATCH = 8
SEQ = 12
VOCAB = 64
STEPS = 3
LR = 1e-2


def make_base(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny Llama built from its config (nothing downloaded), identical in every process."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2 * SEQ,
        use_cache=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


def make_model(method: str, dtype: torch.dtype = torch.float32, dropout: float = 0.0, vectors_seed: int = 5):
    """The tiny Llama with a VeRA or DVoRA adapter on all-linear, vectors randomized (the same everywhere)."""
    model = vt.add_vera(make_base(dtype), "all-linear", r=8, seed=1234, dvora=method == "dvora", dropout=dropout)
    randomize_vectors(model, seed=vectors_seed)
    return model


def data() -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(99))


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train(model: nn.Module, ids: torch.Tensor, steps: int = STEPS) -> dict[str, Any]:
    """AdamW steps; returns the losses and, per step, every vector's whole gradient."""
    opt = torch.optim.AdamW(list(trainable(model).values()), lr=LR, weight_decay=0.0)
    losses, grads = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, ids)
        loss.backward()
        grads.append({n: vt.distributed.host_copy(p.grad) for n, p in trainable(model).items()})
        opt.step()
        losses.append(loss.detach().clone())
    return {"losses": losses, "grads": grads}


def vectors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable vector, whole (gathered from its shards under FSDP2)."""
    return {n: vt.distributed.host_copy(p) for n, p in trainable(model).items()}


def shard(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Each decoder layer is a ``fully_shard`` unit, then the root (the usual FSDP2 recipe)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Hugging Face's activation checkpointing (non-reentrant), under its transformers 5 or 4 name."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def projection_tensors(model: nn.Module) -> list[torch.Tensor]:
    store = model.vera_state.projections
    return [t for key in store.keys_by_name.values() for t in store.get(key)]


class Collectives(TorchDispatchMode):
    """Records each collective operator the process issues, with the largest tensor it moved."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if "c10d" in name:
            flat = [*args, *(kwargs or {}).values(), out]
            tensors = [t for item in flat for t in (item if isinstance(item, (list, tuple)) else [item])]
            sizes = [t.numel() for t in tensors if isinstance(t, torch.Tensor)]
            self.calls.append((name, max(sizes, default=0)))
        return out


def projection_facts(model: nn.Module) -> dict[str, Any]:
    """How the shared projections are held: never a DTensor, parameter, buffer or state_dict entry."""
    from torch.distributed.tensor import DTensor

    pairs = projection_tensors(model)
    held = [*model.parameters(), *model.buffers(), *model.state_dict().values()]
    pointers = {t.to_local().data_ptr() if isinstance(t, DTensor) else t.data_ptr() for t in held}
    return {
        "dtensor": any(isinstance(t, DTensor) for t in pairs),
        "held_by_module": any(t.data_ptr() in pointers for t in pairs),
        "shapes": [tuple(t.shape) for t in pairs],
    }


def _forward_counter(model: nn.Module) -> list[int]:
    count = [0]
    layer = model.model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def run(rank: int, world: int, store_path: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        torch.set_num_threads(1)
        _run_scenarios(rank, world, Path(out_dir))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def _run_scenarios(rank: int, world: int, out: Path) -> None:
    ids = data()
    local = ids[rank * GLOBAL_BATCH // world : (rank + 1) * GLOBAL_BATCH // world]
    results: dict[str, Any] = {"world": world}
    with Collectives() as probe:  # the probe itself must see a collective
        dist.broadcast(torch.zeros(3), src=0)
    results["probe"] = probe.calls
    scenarios = {"train": _train_and_save, "mixed": _mixed, "checkpointing": _checkpointing, "loading": _loading}
    for method in METHODS:
        r: dict[str, Any] = {"errors": {}}
        for name, scenario in scenarios.items():  # a failing scenario is recorded; the others still run
            try:
                scenario(r, method, ids, local, out)
            except Exception:
                r["errors"][name] = traceback.format_exc()
        results[method] = r
    if rank == 0:
        torch.save(results, out / "results.pt")


def _train_and_save(r: dict[str, Any], method: str, ids: torch.Tensor, local: torch.Tensor, out: Path) -> None:
    """Training equals one process; projections regenerated, never sharded; saving gathers only vectors."""
    from vera_torch.distributed import is_sharded

    with Collectives() as building:
        model = make_model(method)
    r["collectives_building"] = building.calls
    r["projections_before"] = projection_facts(model)
    shard(model)
    r["projections_after"] = projection_facts(model)
    r["vectors_sharded"] = is_sharded(trainable(model).values())
    r["checksums"] = vt.check_projections_identical(model)
    r.update(train(model, local))
    r["vectors"] = vectors(model)
    with Collectives() as saving:
        vt.save_adapter(model, out / f"{method}-sharded.safetensors")
    r["collectives_saving"] = saving.calls


def _mixed(r: dict[str, Any], method: str, ids: torch.Tensor, local: torch.Tensor, out: Path) -> None:
    """bfloat16 parameters and float32 reductions; float32 vectors on a bfloat16 base."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mixed = shard(make_model(method, dtype=torch.bfloat16), mp_policy=policy)
    r["mixed_dtypes"] = sorted({str(p.dtype) for p in trainable(mixed).values()})
    r["mixed"] = train(mixed, local, steps=6)
    r["mixed_grad_dtypes"] = sorted({str(p.grad.dtype) for p in trainable(mixed).values()})


def _checkpointing(r: dict[str, Any], method: str, ids: torch.Tensor, local: torch.Tensor, out: Path) -> None:
    """Activation checkpointing: the same training, each layer's forward run twice."""
    for checkpointing in (False, True):
        model = make_model(method, dropout=0.1)
        if checkpointing:
            enable_checkpointing(model)
        shard(model)
        count = _forward_counter(model)
        torch.manual_seed(100 + dist.get_rank())  # the dropout masks: the same in both runs of this rank
        train(model, local, steps=2)
        r[f"checkpointing_{checkpointing}"] = {"vectors": vectors(model), "forwards": count[0]}


def _loading(r: dict[str, Any], method: str, ids: torch.Tensor, local: torch.Tensor, out: Path) -> None:
    """Into the sharded model's own adapter (restore_adapter), and as a new adapter (load_adapter)."""
    from vera_torch.distributed import is_sharded

    saved = out / f"{method}-to-load.safetensors"
    model = shard(make_model(method, vectors_seed=6))
    vt.restore_adapter(model, saved)
    with torch.no_grad():
        r["restored_logits"] = model(input_ids=ids).logits
    train(model, local, steps=2)
    r["restored_vectors"] = vectors(model)
    model = shard(make_base())
    vt.load_adapter(model, saved)
    with torch.no_grad():
        r["loaded_logits"] = model(input_ids=ids).logits
    r["loaded_vectors_sharded"] = is_sharded(trainable(model).values())
    r["loaded_trainable"] = sorted(trainable(model))
