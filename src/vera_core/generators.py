"""The projection generators an adapter file may name, run on the host (NumPy float32).

* ``threefry2x32-20`` version 1: vera-core's own stream
  (:func:`vera_core.generate_projections`, ``docs/projection-spec.md``);
* ``torch-mt19937-peft`` version 1: PEFT's recipe, ``torch.Generator(device="cpu")``
  seeded once with ``projection_prng_key``, A drawn before B, each
  ``uniform_(-bound, bound)`` in float32 with ``bound = sqrt(6 / fan_in)`` (A:
  ``max_in``; B: ``r``), as ``peft.tuners.vera.model._kaiming_init`` draws them. Needs
  PyTorch, imported only when this generator runs.

Any other generator or version is refused (:class:`~vera_core.errors.UnknownGeneratorError`).
"""

from __future__ import annotations

import importlib.util
import math
from typing import TYPE_CHECKING

from vera_core.errors import UnknownGeneratorError
from vera_core.projections import PRNG_ID, PRNG_VERSION, generate_projections

if TYPE_CHECKING:
    import numpy as np

PEFT_PRNG_ID = "torch-mt19937-peft"
"""The ``prng_id`` of adapters whose projections come from PEFT's ``torch.Generator``."""

PEFT_PRNG_VERSION = 1

KNOWN = {(PRNG_ID, PRNG_VERSION), (PEFT_PRNG_ID, PEFT_PRNG_VERSION)}
"""Every ``(prng_id, prng_version)`` this vera-core can regenerate."""


def torch_available() -> bool:
    """Whether PyTorch can be imported (without importing it).

    A folder named ``torch`` on the path (a namespace package, say a project's
    ``tests/torch``) is not PyTorch.
    """
    spec = importlib.util.find_spec("torch")
    return spec is not None and spec.origin is not None


def peft_projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's shared matrices, bit for bit, as NumPy float32 arrays (needs PyTorch).

    Raises UnknownGeneratorError where PyTorch is not installed.

    Examples
    --------
    >>> try:
    ...     A, B = peft_projections(0, 4, 8, 6)
    ...     print(A.shape, B.shape, bool(abs(A).max() <= math.sqrt(6 / 8)))
    ... except UnknownGeneratorError as error:  # no PyTorch here
    ...     print((4, 8), (6, 4), "install torch" in str(error))
    (4, 8) (6, 4) True
    """
    if not torch_available():
        raise UnknownGeneratorError(
            f"the projections come from PEFT's torch generator ({PEFT_PRNG_ID}) and are not stored: "
            "install torch to regenerate them"
        )
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    A = torch.empty(r, max_in).uniform_(-math.sqrt(6.0 / max_in), math.sqrt(6.0 / max_in), generator=generator)
    B = torch.empty(max_out, r).uniform_(-math.sqrt(6.0 / r), math.sqrt(6.0 / r), generator=generator)
    return A.numpy(), B.numpy()


def check_known(prng_id: str, prng_version: int) -> None:
    """Raise UnknownGeneratorError unless this vera-core can regenerate with the generator."""
    if (prng_id, prng_version) not in KNOWN:
        known = " and ".join(f"{name} v{version}" for name, version in sorted(KNOWN))
        raise UnknownGeneratorError(
            f"the projections come from generator {prng_id!r} version {prng_version}, which this vera-core "
            f"cannot regenerate (it knows {known}); save the adapter with its projections stored"
        )


def regenerate(
    prng_id: str, prng_version: int, seed: int, r: int, max_in: int, max_out: int
) -> tuple[np.ndarray, np.ndarray]:
    """The float32 projections ``A`` (r, max_in) and ``B`` (max_out, r) of a known generator.

    Examples
    --------
    >>> A, B = regenerate(PRNG_ID, PRNG_VERSION, 0, 4, 8, 6)
    >>> A.dtype.name, B.shape
    ('float32', (6, 4))
    """
    import numpy as np

    check_known(prng_id, prng_version)
    if prng_id == PEFT_PRNG_ID:
        return peft_projections(seed, r, max_in, max_out)
    A, B = generate_projections(seed, r, max_in, max_out, xp=np, dtype=np.float32)
    return A, B
