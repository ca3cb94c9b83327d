"""Data-parallel and sharded training: every rank regenerates the projections; nothing is broadcast.

The shared projections are deterministic (Threefry from the seed, bit-identical on every
device), so :func:`vera_torch.add_vera` on each rank yields the same matrices. They are
plain tensors, not module parameters or buffers, so neither ``DistributedDataParallel``
nor FSDP2's ``fully_shard`` broadcasts or shards them; only the trainable vectors are
synchronised (DDP all-reduces their gradients, FSDP2 shards them with their layer).
:func:`check_projections_identical` verifies the matrices agree with one all-gather of
checksums.

Under FSDP2 the vectors are ``DTensor`` shards between steps. Saving gathers only them
(:func:`host_copy`, never a base weight) and writes the file once (:func:`write_once`);
:func:`copy_into` puts a whole tensor read from a file into a sharded parameter, each rank
keeping its own part (no communication).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["check_projections_identical", "copy_into", "host_copy", "is_sharded", "write_once"]


def check_projections_identical(model: nn.Module, group: Any = None) -> dict[str, str]:
    """Raise RuntimeError unless every rank holds bit-identical projections; return the checksums.

    Each rank hashes its pairs (SHA-256 of the float32 bytes); one ``all_gather_object``
    compares them. ``model`` is the adapted model (unwrap DDP's ``.module``; an FSDP2
    model is passed as it is).
    """
    import torch.distributed as dist

    from vera_torch.model import get_state
    from vera_torch.projections import checksum

    store = get_state(model).projections
    local = {name: checksum(*store.get(key)) for name, key in sorted(store.keys_by_name.items())}
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    if any(other != local for other in gathered):
        raise RuntimeError(f"the ranks hold different projections: {gathered}")
    return local


def _as_dtensor(tensor: torch.Tensor) -> DTensor | None:
    """``tensor`` when it is a DTensor, else None (also without torch.distributed)."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return tensor if isinstance(tensor, DTensor) else None


def is_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor`` (a parameter sharded by FSDP2, say).

    Examples
    --------
    >>> is_sharded(nn.Linear(2, 2).parameters())
    False
    """
    return any(_as_dtensor(t) is not None for t in tensors)


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of the whole tensor; a ``DTensor`` is gathered first.

    Gathering is a collective over the tensor's device mesh: every rank calls this in the
    same order. Only the tensor passed is gathered.

    Examples
    --------
    >>> host_copy(torch.ones(2, requires_grad=True))
    tensor([1., 1.])
    """
    sharded = _as_dtensor(tensor)
    whole = sharded.full_tensor() if sharded is not None else tensor
    return whole.detach().cpu()


def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole tensor ``value`` into ``target``, a plain tensor or a ``DTensor``.

    A ``DTensor`` target keeps its placements: each rank slices its own part of ``value``
    (which every rank holds, having read the same file), so nothing is communicated.
    Raises ValueError, changing nothing, when the shapes differ.

    Examples
    --------
    >>> target = torch.zeros(3)
    >>> copy_into(target, torch.arange(3.0)); target
    tensor([0., 1., 2.])
    """
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(f"cannot copy a tensor of shape {tuple(value.shape)} into one of shape {tuple(target.shape)}")
    sharded = _as_dtensor(target)
    with torch.no_grad():
        if sharded is not None:
            from torch.distributed.tensor import distribute_tensor

            local = value.to(device=sharded.to_local().device, dtype=sharded.dtype)
            value = distribute_tensor(local, sharded.device_mesh, sharded.placements, src_data_rank=None)
        target.copy_(value)


def write_once(write: Callable[[], None], sharded: bool) -> None:
    """Run ``write`` on this process, or, for a ``sharded`` model, on global rank 0 only.

    In the sharded case every rank must call this (it is a collective): rank 0 writes and
    tells the others whether that worked, so a failure raises on every rank alike and no
    rank returns before the file is complete.
    """
    if not sharded:
        write()
        return
    import torch.distributed as dist

    error: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            write()
        except Exception as exc:
            error[0] = f"{type(exc).__name__}: {exc}"
            dist.broadcast_object_list(error, src=0)
            raise
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None and dist.get_rank() != 0:
        raise RuntimeError(f"rank 0 failed to write the adapter: {error[0]}")
