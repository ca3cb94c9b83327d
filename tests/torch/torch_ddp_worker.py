"""The per-process body of the DDP test (a module of its own so that spawn can import it)."""

from __future__ import annotations

from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")  # also skips --doctest-modules collection without torch

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch_helpers import TinyLM  # noqa: E402

import vera_torch as vt  # noqa: E402

STEPS = 5
GLOBAL_BATCH = 8


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = TinyLM(d=16, vocab=11, n_layers=2)
    return vt.add_vera(model, "all-linear", r=8, seed=1234, d_initial=0.5)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return torch.randint(0, 11, (GLOBAL_BATCH, 6), generator=g), torch.randint(0, 11, (GLOBAL_BATCH, 6), generator=g)


def train(model: nn.Module, ids: torch.Tensor, target: torch.Tensor, forward=None) -> None:
    forward = forward or model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(forward(ids).flatten(0, 1), target.flatten())
        loss.backward()
        opt.step()


def vectors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(rank: int, world: int, store_path: str, out_path: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        torch.set_num_threads(1)
        model = make_model()
        checksums = vt.check_projections_identical(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        ids, target = data()
        shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        train(model, ids[shard], target[shard], forward=ddp)
        if rank == 0:
            torch.save({"vectors": vectors(model), "checksums": checksums}, out_path)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
