"""Training and evaluation loops for :mod:`vera_numpy` networks (AdamW, warmup-cosine, clipping)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as device_of


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Limit BLAS to one thread (a no-op without threadpoolctl).

    The demo's matrices are too small to gain from more threads, and the results then do
    not depend on the machine's core count.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def evaluate(net: Any, x: Any, y: Any) -> float:
    """Accuracy of ``net`` on ``(x, y)`` in evaluation mode."""
    from vera_numpy import accuracy

    net.eval()
    with one_blas_thread():
        return accuracy(net.forward(x), y)


def fit(
    net: Any,
    params: dict[str, Any],
    x: Any,
    y: Any,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: Any,
) -> float:
    """Train ``params`` of ``net`` on ``(x, y)``; return the last epoch's mean loss.

    AdamW without weight decay, 10% linear warmup then cosine decay, gradients clipped
    to norm 1; ``progress`` (a tqdm bar) advances once per step.
    """
    import vera_numpy as vn

    xp = array_namespace(x)
    n = int(x.shape[0])
    steps_per_epoch = max(1, -(-n // batch_size))
    total = epochs * steps_per_epoch
    optimizer = vn.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = vn.WarmupCosine(lr, warmup_steps=max(1, total // 10), total_steps=total + 1)
    rng = np.random.default_rng(seed)
    net.train()
    mean_loss = float("nan")
    with one_blas_thread():
        for epoch in range(epochs):
            order = xp.asarray(rng.permutation(n), device=device_of(x))  # on the data's device
            mean_loss = _epoch(
                net, params, optimizer, schedule, x, y, order, batch_size, epoch * steps_per_epoch, progress
            )
    return mean_loss


def _epoch(
    net: Any,
    params: dict[str, Any],
    optimizer: Any,
    schedule: Any,
    x: Any,
    y: Any,
    order: Any,
    batch_size: int,
    step: int,
    progress: Any,
) -> float:
    """One pass over the data in the given order, from global step ``step``; returns the mean loss."""
    import vera_numpy as vn

    losses = []
    for start in range(0, int(order.shape[0]), batch_size):
        batch = order[start : start + batch_size]
        net.zero_grad()
        loss, grad_logits = vn.softmax_cross_entropy(net.forward(x[batch]), y[batch])
        net.backward(grad_logits, input_grad=False)
        grads = {name: grad for name, grad in net.grads().items() if name in params}
        vn.clip_grad_norm(grads, 1.0)
        schedule.apply(optimizer, step)
        optimizer.step(grads)
        losses.append(float(loss))
        step += 1
        progress.update(1)
    mean_loss = float(np.mean(losses))
    progress.set_postfix(loss=f"{mean_loss:.3f}")
    return mean_loss
