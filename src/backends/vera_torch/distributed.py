"""Data-parallel training: every rank regenerates the projections; nothing is broadcast.

The shared projections are deterministic (Threefry from the seed, bit-identical on every
device), so :func:`vera_torch.add_vera` on each rank yields the same matrices. They are
plain tensors, not module buffers, so ``DistributedDataParallel`` neither broadcasts them
when it is built nor before each forward; only the trainable vectors' gradients are
all-reduced. :func:`check_projections_identical` verifies the matrices agree with one
all-gather of checksums.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["check_projections_identical"]


def check_projections_identical(model: nn.Module, group: Any = None) -> dict[str, str]:
    """Raise RuntimeError unless every rank holds bit-identical projections; return the checksums.

    Each rank hashes its pairs (SHA-256 of the float32 bytes); one ``all_gather_object``
    compares them. ``model`` is the adapted model (unwrap DDP's ``.module``).
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
