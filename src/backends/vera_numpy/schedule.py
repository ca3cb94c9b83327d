"""Learning-rate schedule: linear warmup, then cosine decay."""

from __future__ import annotations

import math
from typing import Any


class WarmupCosine:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then cosine decay to ``final_lr``.

    ``lr(t) = peak * t / warmup`` for ``t < warmup``; afterwards, with
    ``p = (t - warmup) / (total - warmup)`` clamped to [0, 1],
    ``lr(t) = final + (peak - final) * (1 + cos(pi p)) / 2`` (the Hugging Face
    ``get_cosine_schedule_with_warmup`` shape, with a floor). The rate is a host float:
    set ``optimizer.lr = schedule(step)`` before each step, or call :meth:`apply`.

    Parameters
    ----------
    peak_lr : float
    warmup_steps : int
        Steps of linear warmup (0 for none).
    total_steps : int
        Step at which the rate reaches ``final_lr`` (and stays).
    final_lr : float

    Examples
    --------
    >>> schedule = WarmupCosine(1.0, warmup_steps=2, total_steps=6)
    >>> [round(schedule(t), 3) for t in range(7)]
    [0.0, 0.5, 1.0, 0.854, 0.5, 0.146, 0.0]
    """

    def __init__(self, peak_lr: float, warmup_steps: int, total_steps: int, final_lr: float = 0.0) -> None:
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
        if peak_lr < 0 or final_lr < 0:
            raise ValueError(f"learning rates must be non-negative, got {peak_lr!r} and {final_lr!r}")
        self.peak_lr, self.final_lr = float(peak_lr), float(final_lr)
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        """The learning rate at ``step`` (counting from 0)."""
        if step < self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final_lr + (self.peak_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: Any, step: int) -> float:
        """Set ``optimizer.lr`` to the rate at ``step`` and return it."""
        optimizer.lr = self(step)
        return optimizer.lr
