"""The many-users demo on PyTorch: vera_torch's adapter bank and ``BankAdamW``, the same run as on NumPy."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vera_cli.demo.models import LAYERS
from vera_cli.demo.tenant_loop import Tenants
from vera_cli.demo.torch_engine import Mlp, _one_thread


class TorchTenants(Tenants):
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

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        self.model.eval()
        with torch.no_grad(), _one_thread():
            yield

    def _training(self) -> contextlib.AbstractContextManager[None]:
        return _one_thread()

    def _predict(self, users: slice, x: np.ndarray) -> np.ndarray:
        index = self.slots[users].repeat_interleave(x.shape[0] // (users.stop - users.start))
        return self.model(torch.as_tensor(x), adapter_names=index).argmax(dim=1).numpy()

    def _trainer(
        self, x: np.ndarray, y: np.ndarray, rows_per_user: int, lr: float, total: int
    ) -> Callable[[np.ndarray, int], Any]:
        import vera_numpy as vn
        import vera_torch as vt

        users = x.shape[0]
        optimizer = vt.BankAdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        schedule = vn.WarmupCosine(lr, warmup_steps=max(1, total // 10), total_steps=total + 1)
        flat_x, flat_y = torch.as_tensor(x.reshape(-1, x.shape[-1])), torch.as_tensor(y.reshape(-1))
        index = self.slots.repeat_interleave(rows_per_user)
        self.model.train()

        def step(rows: np.ndarray, count: int) -> Any:
            picked = torch.from_numpy(rows)
            for group in optimizer.param_groups:
                group["lr"] = schedule(count)
            optimizer.zero_grad(set_to_none=True)
            logits = self.model(flat_x[picked], adapter_names=index)
            loss = nn.functional.cross_entropy(logits, flat_y[picked], reduction="sum") / rows_per_user
            loss.backward()  # each user's mean over its own rows
            optimizer.step()
            return loss.detach() / users

        return step

    def _serve_runs(self, x: np.ndarray) -> tuple[dict[str, Callable[[], Any]], Callable[[Any], Any]]:
        import vera_torch as vt

        rows = torch.as_tensor(x)
        base = Mlp(self.weights).eval()
        one = vt.add_vera(Mlp(self.weights), list(LAYERS), r=self.rank, seed=self.seed).eval()
        index = self.slots[: x.shape[0]]
        runs: dict[str, Callable[[], Any]] = {
            "base": lambda: base(rows),
            "one adapter": lambda: one(rows),
            "mixed": lambda: self.model(rows, adapter_names=index),
        }
        return runs, lambda out: out  # the CPU: a result exists when the call returns

    def _save_one(self, path: Path, name: str) -> None:
        import vera_torch as vt

        vt.save_adapter(self.model, path, name)
