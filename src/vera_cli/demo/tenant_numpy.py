"""The many-users demo on :mod:`vera_numpy` (NumPy, or CuPy through its backend): one bank, one batched run.

Every user's adapter is a row of a :class:`vera_numpy.BankModel`; a training step holds
``rows_per_user`` images of every user, each row served and trained by its own adapter,
and :class:`vera_numpy.BankAdamW` moves each adapter as if it were trained alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vera_cli.demo.models import LAYERS
from vera_cli.demo.train import one_blas_thread

EVAL_ROWS = 16384
"""Rows per forward when measuring every user's accuracy."""


def _network(layer: Callable[[str], Any]) -> Any:
    import vera_numpy as vn

    return vn.Sequential(
        {"fc1": layer("fc1"), "relu1": vn.ReLU(), "fc2": layer("fc2"), "relu2": vn.ReLU(), "head": layer("head")}
    )


class NumpyTenants:
    """N users' VeRA adapters in one :class:`vera_numpy.BankModel` over the pretrained weights.

    Parameters
    ----------
    weights : mapping of str to array
        The pretrained weights, on the device.
    names : list of str
        One adapter per user, in user order.
    rank, seed : int
        Of every adapter (one shared projection pair).
    from_host, to_host : callable
        Host <-> device copies of the backend.
    """

    def __init__(
        self,
        weights: Mapping[str, Any],
        names: list[str],
        *,
        rank: int,
        seed: int,
        from_host: Callable[[np.ndarray], Any],
        to_host: Callable[[Any], np.ndarray],
    ) -> None:
        import vera_numpy as vn

        self.weights, self.names, self.rank, self.seed = dict(weights), names, rank, seed
        self.from_host, self.to_host = from_host, to_host
        started = time.perf_counter()
        self.model = vn.BankModel(self.weights)
        self.model.reserve(len(names))
        for name in names:
            self.model.add_vera(name, list(LAYERS), r=rank, seed=seed)
        self.add_seconds = time.perf_counter() - started
        self.net = _network(self.model.layer)
        self.xp = self.model.backend.xp

    def accuracy(self, x_test: np.ndarray, y_test: np.ndarray) -> np.ndarray:
        """Each user's accuracy on its own test images ``x_test[user]`` (users, images, 64)."""
        users, images = x_test.shape[:2]
        chunk = max(1, EVAL_ROWS // images)
        hits = np.zeros(users)
        self.net.eval()
        with one_blas_thread():
            for start in range(0, users, chunk):
                stop = min(users, start + chunk)
                self.model.use(np.repeat(np.arange(start, stop), images))
                logits = self.net.forward(self.from_host(x_test[start:stop].reshape(-1, x_test.shape[-1])))
                predicted = self.to_host(self.xp.argmax(logits, axis=1)).reshape(stop - start, images)
                hits[start:stop] = (predicted == y_test[None, :]).mean(axis=1)
        return hits

    def train(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        rows_per_user: int,
        lr: float,
        seed: int,
        progress: Any,
    ) -> float:
        """Train every user's adapter on its own images ``x[user]`` in one batched run; the last epoch's mean loss.

        Each step holds ``rows_per_user`` images of every user; each user's loss is the mean
        over its own rows. AdamW (no weight decay), 10% warmup then cosine decay.
        """
        import vera_numpy as vn

        xp = self.xp
        users, images = x.shape[:2]
        steps_per_epoch = max(1, images // rows_per_user)
        total = epochs * steps_per_epoch
        optimizer = vn.BankAdamW(self.model, lr=lr, weight_decay=0.0)
        schedule = vn.WarmupCosine(lr, warmup_steps=max(1, total // 10), total_steps=total + 1)
        flat_x, flat_y = self.from_host(x.reshape(-1, x.shape[-1])), self.from_host(y.reshape(-1))
        self.model.use(np.repeat(np.arange(users), rows_per_user))  # the same rows every step: made once
        rng = np.random.default_rng(seed)
        self.net.train()
        step, mean_loss = 0, float("nan")
        with one_blas_thread():
            for _ in range(epochs):
                order = np.argsort(rng.random((users, images)), axis=1)
                losses = []
                for batch in range(steps_per_epoch):
                    picked = order[:, batch * rows_per_user : (batch + 1) * rows_per_user]
                    index = self.from_host((picked + images * np.arange(users)[:, None]).reshape(-1))
                    self.model.zero_grad()
                    loss, grad = vn.softmax_cross_entropy(
                        self.net.forward(xp.take(flat_x, index, axis=0)), xp.take(flat_y, index, axis=0)
                    )
                    self.net.backward(grad * users, input_grad=False)  # each user's mean over its own rows
                    schedule.apply(optimizer, step)
                    optimizer.step()
                    losses.append(loss)
                    step += 1
                    progress.update(1)
                mean_loss = float(sum(float(value) for value in losses)) / len(losses)
                progress.set_postfix(loss=f"{mean_loss:.3f}")
        return mean_loss

    def serve(self, x: np.ndarray, repeats: int) -> dict[str, float]:
        """Seconds per forward of one mixed batch (row ``i``: user ``i``), the bare base and one adapter on it.

        The three are timed interleaved, the best of ``repeats`` each (the least disturbed by other work).
        """
        import vera_numpy as vn

        users = x.shape[0]
        rows = self.from_host(x)
        base = _network(lambda name: vn.Linear(self.weights[f"{name}.weight"], self.weights[f"{name}.bias"]))
        single = vn.add_vera(self.weights, list(LAYERS), r=self.rank, seed=self.seed)
        one = _network(single.layer)
        self.model.use(np.arange(users))
        self.net.eval()
        runs: dict[str, Callable[[], Any]] = {
            "base": lambda: base.forward(rows),
            "one adapter": lambda: one.forward(rows),
            "mixed": lambda: self.net.forward(rows),
        }
        return _timed(runs, repeats, lambda out: self.to_host(out[:1]))

    def save(self, folder: Path) -> list[Path]:
        """One ordinary adapter file per user."""
        paths = []
        for name in self.names:
            path = folder / f"{name}.safetensors"
            self.model.save_adapter(path, name)
            paths.append(path)
        return paths


def _timed(runs: dict[str, Callable[[], Any]], repeats: int, wait: Callable[[Any], Any]) -> dict[str, float]:
    """The best seconds of each run, interleaved; ``wait`` blocks until a result exists (a device copy)."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    with one_blas_thread():
        for run in runs.values():
            wait(run())  # warm-up
        for _ in range(repeats):
            for name, run in runs.items():
                started = time.perf_counter()
                wait(run())
                seconds[name].append(time.perf_counter() - started)
    return {name: min(values) for name, values in seconds.items()}
