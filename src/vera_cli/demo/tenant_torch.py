"""The many-users demo on PyTorch: vera_torch's adapter bank and ``BankAdamW``, the same run as on NumPy."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vera_cli.demo.models import LAYERS
from vera_cli.demo.tenant_numpy import EVAL_ROWS
from vera_cli.demo.torch_engine import Mlp, _one_thread


class TorchTenants:
    """N users' VeRA adapters on one :class:`~vera_cli.demo.torch_engine.Mlp` (see :class:`NumpyTenants`)."""

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
        import vera_torch as vt

        self.weights = {k: torch.as_tensor(v) for k, v in weights.items()}
        self.names, self.rank, self.seed = names, rank, seed
        started = time.perf_counter()
        self.model: nn.Module = Mlp(self.weights)
        vt.add_vera(self.model, list(LAYERS), r=rank, seed=seed, adapter_name=names[0])
        vt.reserve(self.model, len(names))
        for name in names[1:]:
            vt.add_vera(self.model, list(LAYERS), r=rank, seed=seed, adapter_name=name)
        vt.set_adapter(self.model, names)  # every user's rows train
        self.add_seconds = time.perf_counter() - started
        self.slots = vt.adapter_index(self.model, names)

    def accuracy(self, x_test: np.ndarray, y_test: np.ndarray) -> np.ndarray:
        """Each user's accuracy on its own test images ``x_test[user]`` (users, images, 64)."""
        users, images = x_test.shape[:2]
        chunk = max(1, EVAL_ROWS // images)
        hits = np.zeros(users)
        self.model.eval()
        with torch.no_grad(), _one_thread():
            for start in range(0, users, chunk):
                stop = min(users, start + chunk)
                index = self.slots[start:stop].repeat_interleave(images)
                x = torch.as_tensor(x_test[start:stop].reshape(-1, x_test.shape[-1]))
                predicted = self.model(x, adapter_names=index).argmax(dim=1).numpy().reshape(stop - start, images)
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
        """As :meth:`NumpyTenants.train`, with ``vera_torch.BankAdamW``."""
        import vera_numpy as vn
        import vera_torch as vt

        users, images = x.shape[:2]
        steps_per_epoch = max(1, images // rows_per_user)
        total = epochs * steps_per_epoch
        optimizer = vt.BankAdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        schedule = vn.WarmupCosine(lr, warmup_steps=max(1, total // 10), total_steps=total + 1)
        flat_x, flat_y = torch.as_tensor(x.reshape(-1, x.shape[-1])), torch.as_tensor(y.reshape(-1))
        index = self.slots.repeat_interleave(rows_per_user)
        rng = np.random.default_rng(seed)
        self.model.train()
        step, mean_loss = 0, float("nan")
        with _one_thread():
            for _ in range(epochs):
                order = np.argsort(rng.random((users, images)), axis=1)
                losses = []
                for batch in range(steps_per_epoch):
                    picked = order[:, batch * rows_per_user : (batch + 1) * rows_per_user]
                    rows = torch.from_numpy((picked + images * np.arange(users)[:, None]).reshape(-1))
                    for group in optimizer.param_groups:
                        group["lr"] = schedule(step)
                    optimizer.zero_grad(set_to_none=True)
                    logits = self.model(flat_x[rows], adapter_names=index)
                    loss = nn.functional.cross_entropy(logits, flat_y[rows], reduction="sum") / rows_per_user
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()) / users)
                    step += 1
                    progress.update(1)
                mean_loss = float(np.mean(losses))
                progress.set_postfix(loss=f"{mean_loss:.3f}")
        return mean_loss

    def serve(self, x: np.ndarray, repeats: int) -> dict[str, float]:
        """As :meth:`NumpyTenants.serve`."""
        import vera_torch as vt

        rows = torch.as_tensor(x)
        base = Mlp(self.weights).eval()
        one = vt.add_vera(Mlp(self.weights), list(LAYERS), r=self.rank, seed=self.seed).eval()
        self.model.eval()
        index = self.slots[: x.shape[0]]
        runs: dict[str, Callable[[], Any]] = {
            "base": lambda: base(rows),
            "one adapter": lambda: one(rows),
            "mixed": lambda: self.model(rows, adapter_names=index),
        }
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        with torch.no_grad(), _one_thread():
            for run in runs.values():
                run()
            for _ in range(repeats):
                for name, run in runs.items():
                    started = time.perf_counter()
                    run()
                    seconds[name].append(time.perf_counter() - started)
        return {name: min(values) for name, values in seconds.items()}

    def save(self, folder: Path) -> list[Path]:
        """One ordinary adapter file per user."""
        import vera_torch as vt

        paths = []
        for name in self.names:
            path = folder / f"{name}.safetensors"
            vt.save_adapter(self.model, path, name)
            paths.append(path)
        return paths
