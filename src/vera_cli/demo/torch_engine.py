"""The demo on PyTorch: the same network, methods and schedule as the NumPy path, with autograd.

VeRA and DVoRA come from :func:`vera_torch.add_vera`; the LoRA baseline is a small
module here, as on the NumPy path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vera_cli.demo.methods import Settings, Setup
from vera_cli.demo.models import LAYERS
from vera_core.atomic import write_file


class Mlp(nn.Module):
    """``fc1 -> ReLU -> fc2 -> ReLU -> head``, loaded from a weight dict."""

    fc1: nn.Module
    fc2: nn.Module
    head: nn.Module

    def __init__(self, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        for name in LAYERS:
            out_features, in_features = weights[f"{name}.weight"].shape
            setattr(self, name, nn.Linear(in_features, out_features))
        self.load_state_dict({k: v.detach().clone() for k, v in weights.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trained ``(alpha / r) B A`` (A as PEFT draws it, B zero)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        bound = 1.0 / math.sqrt(base.in_features)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features).uniform_(-bound, bound, generator=generator))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T


def _save_tensors(tensors: Callable[[], Mapping[str, torch.Tensor]]) -> Callable[[Path], None]:
    def save(path: Path) -> None:
        from safetensors.torch import save_file

        host = {name: value.detach().cpu().contiguous() for name, value in tensors().items()}
        write_file(path, lambda tmp: save_file(host, tmp))

    return save


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run on one intra-op thread: the demo's matrices are too small to gain from more."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def build(method: str, weights: Mapping[str, Any], settings: Settings, to_host: Any) -> Setup:
    """The model and trainable parameters of ``method`` (see :func:`vera_cli.demo.methods.build`)."""
    import vera_torch as vt

    lr = settings.learning_rates[method]
    model: nn.Module = Mlp(weights)
    if method == "full":
        return Setup(model, _trainable(model), _save_tensors(model.state_dict), "full.safetensors", lr)
    if method == "lora":
        generator = torch.Generator().manual_seed(settings.seed)
        for name in LAYERS:
            setattr(
                model, name, LoraLinear(getattr(model, name), settings.lora_rank, 2.0 * settings.lora_rank, generator)
            )
        params = _trainable(model)
        return Setup(model, params, _save_tensors(lambda: params), "lora.safetensors", lr)
    model = vt.add_vera(model, list(LAYERS), r=settings.vera_rank, seed=settings.seed, dvora=method == "dvora")
    return Setup(model, _trainable(model), lambda path: vt.save_adapter(model, path), f"{method}.safetensors", lr)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy in evaluation mode."""
    model.eval()
    with torch.no_grad(), _one_thread():
        return float((model(x).argmax(dim=1) == y).float().mean())


def fit(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: Any,
) -> float:
    """As :func:`vera_cli.demo.train.fit`: AdamW, warmup-cosine, clipping to norm 1."""
    n = int(x.shape[0])
    total = epochs * max(1, -(-n // batch_size))
    warmup = max(1, total // 10)
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total + 1 - warmup))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng = np.random.default_rng(seed)
    model.train()
    mean_loss = float("nan")
    with _one_thread():
        for _ in range(epochs):
            mean_loss = _epoch(model, params, optimizer, schedule, x, y, rng.permutation(n), batch_size, progress)
    return mean_loss


def _epoch(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    order: np.ndarray,
    batch_size: int,
    progress: Any,
) -> float:
    """One pass over the data in the given order; returns the mean loss."""
    index = torch.from_numpy(order)
    losses = []
    for start in range(0, len(order), batch_size):
        batch = index[start : start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        progress.update(1)
    mean_loss = float(np.mean(losses))
    progress.set_postfix(loss=f"{mean_loss:.3f}")
    return mean_loss
