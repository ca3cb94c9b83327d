"""The many-users demo on :mod:`vera_numpy` (NumPy, or CuPy through its backend): one bank, one batched run.

Every user's adapter is a row of a :class:`vera_numpy.BankModel`; a training step holds
``rows_per_user`` images of every user, each row served and trained by its own adapter,
and :class:`vera_numpy.BankAdamW` moves each adapter as if it were trained alone.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vera_cli.demo.models import LAYERS
from vera_cli.demo.tenant_loop import Tenants
from vera_cli.demo.train import one_blas_thread


def _network(layer: Callable[[str], Any]) -> Any:
    import vera_numpy as vn

    return vn.Sequential(
        {"fc1": layer("fc1"), "relu1": vn.ReLU(), "fc2": layer("fc2"), "relu2": vn.ReLU(), "head": layer("head")}
    )


class NumpyTenants(Tenants):
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

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        self.net.eval()
        with one_blas_thread():
            yield

    def _training(self) -> contextlib.AbstractContextManager[None]:
        return one_blas_thread()

    def _predict(self, users: slice, x: np.ndarray) -> np.ndarray:
        self.model.use(np.repeat(np.arange(users.start, users.stop), x.shape[0] // (users.stop - users.start)))
        return self.to_host(self.xp.argmax(self.net.forward(self.from_host(x)), axis=1))

    def _trainer(
        self, x: np.ndarray, y: np.ndarray, rows_per_user: int, lr: float, total: int
    ) -> Callable[[np.ndarray, int], Any]:
        import vera_numpy as vn

        xp, users = self.xp, x.shape[0]
        optimizer = vn.BankAdamW(self.model, lr=lr, weight_decay=0.0)
        schedule = vn.WarmupCosine(lr, warmup_steps=max(1, total // 10), total_steps=total + 1)
        flat_x, flat_y = self.from_host(x.reshape(-1, x.shape[-1])), self.from_host(y.reshape(-1))
        self.model.use(np.repeat(np.arange(users), rows_per_user))  # the same rows every step: made once
        self.net.train()

        def step(rows: np.ndarray, index: int) -> Any:
            picked = self.from_host(rows)
            self.model.zero_grad()
            loss, grad = vn.softmax_cross_entropy(
                self.net.forward(xp.take(flat_x, picked, axis=0)), xp.take(flat_y, picked, axis=0)
            )
            self.net.backward(grad * users, input_grad=False)  # each user's mean over its own rows
            schedule.apply(optimizer, index)
            optimizer.step()
            return loss

        return step

    def _serve_runs(self, x: np.ndarray) -> tuple[dict[str, Callable[[], Any]], Callable[[Any], Any]]:
        import vera_numpy as vn

        rows = self.from_host(x)
        base = _network(lambda name: vn.Linear(self.weights[f"{name}.weight"], self.weights[f"{name}.bias"]))
        one = _network(vn.add_vera(self.weights, list(LAYERS), r=self.rank, seed=self.seed).layer)
        self.model.use(np.arange(x.shape[0]))
        runs: dict[str, Callable[[], Any]] = {
            "base": lambda: base.forward(rows),
            "one adapter": lambda: one.forward(rows),
            "mixed": lambda: self.net.forward(rows),
        }
        return runs, lambda out: self.to_host(out[:1])  # a device copy waits for the result

    def _save_one(self, path: Path, name: str) -> None:
        self.model.save_adapter(path, name)
