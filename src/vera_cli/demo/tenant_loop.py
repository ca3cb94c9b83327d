"""The many-users demo's loops, the same for every engine: evaluate, train, time and save N users.

An engine (:class:`~vera_cli.demo.tenant_numpy.NumpyTenants`,
:class:`~vera_cli.demo.tenant_torch.TorchTenants`) holds one adapter bank over the
pretrained model and supplies the few steps that speak its library; :class:`Tenants`
runs them.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

EVAL_ROWS = 16384
"""Rows per forward when measuring every user's accuracy."""


class Tenants(abc.ABC):
    """N users' VeRA adapters (one per user, in user order) in one bank; the shared loops.

    Engines set ``names`` and ``add_seconds`` and define the hooks below.
    """

    names: list[str]
    add_seconds: float

    @abc.abstractmethod
    def _quiet(self) -> contextlib.AbstractContextManager[None]:
        """Evaluation: eval mode, no gradients, one thread."""

    @abc.abstractmethod
    def _predict(self, users: slice, x: np.ndarray) -> np.ndarray:
        """Predicted labels (host) of rows ``x`` (host), which belong to ``users`` in equal runs."""

    @abc.abstractmethod
    def _trainer(
        self, x: np.ndarray, y: np.ndarray, rows_per_user: int, lr: float, total: int
    ) -> Callable[[np.ndarray, int], Any]:
        """A training step ``step(rows, index) -> mean loss per row`` (a scalar ``float`` takes, read once an epoch)."""

    @abc.abstractmethod
    def _training(self) -> contextlib.AbstractContextManager[None]:
        """Training: one thread."""

    @abc.abstractmethod
    def _serve_runs(self, x: np.ndarray) -> tuple[dict[str, Callable[[], Any]], Callable[[Any], Any]]:
        """The runs ``base``, ``one adapter`` and ``mixed`` over rows ``x``, and how to wait for a result."""

    @abc.abstractmethod
    def _save_one(self, path: Path, name: str) -> None:
        """Write adapter ``name`` as an ordinary adapter file at ``path``."""

    def accuracy(self, x_test: np.ndarray, y_test: np.ndarray) -> np.ndarray:
        """Each user's accuracy on its own test images ``x_test[user]`` (users, images, 64)."""
        users, images = x_test.shape[:2]
        chunk = max(1, EVAL_ROWS // images)
        hits = np.zeros(users)
        with self._quiet():
            for start in range(0, users, chunk):
                stop = min(users, start + chunk)
                flat = x_test[start:stop].reshape(-1, x_test.shape[-1])
                predicted = self._predict(slice(start, stop), flat).reshape(stop - start, images)
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

        Each step holds ``rows_per_user`` images of every user (user ``u``'s rows at
        ``u * rows_per_user``); each user's loss is the mean over its own rows. AdamW with
        its state per row (no weight decay), 10% warmup then cosine decay.
        """
        users, images = x.shape[:2]
        steps_per_epoch = max(1, images // rows_per_user)
        step = self._trainer(x, y, rows_per_user, lr, epochs * steps_per_epoch)
        rng = np.random.default_rng(seed)
        offsets = images * np.arange(users)[:, None]
        index, mean_loss = 0, float("nan")
        with self._training():
            for _ in range(epochs):
                order = np.argsort(rng.random((users, images)), axis=1)
                losses = []
                for batch in range(steps_per_epoch):
                    picked = order[:, batch * rows_per_user : (batch + 1) * rows_per_user]
                    losses.append(step((picked + offsets).reshape(-1), index))
                    index += 1
                    progress.update(1)
                mean_loss = sum(float(value) for value in losses) / len(losses)  # one device read an epoch
                progress.set_postfix(loss=f"{mean_loss:.3f}")
        return mean_loss

    def serve(self, x: np.ndarray, repeats: int) -> dict[str, float]:
        """Seconds per forward of one mixed batch (row ``i``: user ``i``), the bare base and one adapter on it.

        The three are timed interleaved, the best of ``repeats`` each (the least disturbed by other work).
        """
        runs, wait = self._serve_runs(x)
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        with self._quiet():
            for run in runs.values():
                wait(run())  # warm-up
            for _ in range(repeats):
                for name, run in runs.items():
                    started = time.perf_counter()
                    wait(run())
                    seconds[name].append(time.perf_counter() - started)
        return {name: min(values) for name, values in seconds.items()}

    def save(self, folder: Path) -> list[Path]:
        """One ordinary adapter file per user."""
        paths = []
        for name in self.names:
            path = folder / f"{name}.safetensors"
            self._save_one(path, name)
            paths.append(path)
        return paths
