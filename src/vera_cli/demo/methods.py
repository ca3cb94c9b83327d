"""The four ways the demo adapts the pretrained network, on :mod:`vera_numpy` layers.

Each builder takes the frozen weights (on the device) and returns a :class:`Setup`: the
network to train, its trainable arrays, and how to write what was trained to a file.
Every method adapts all three dense layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vera_cli.demo.lora import LoraLinear
from vera_cli.demo.models import LAYERS, network
from vera_core.atomic import write_file

METHODS = ("full", "lora", "vera", "dvora")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Hyperparameters of the adaptation runs."""

    vera_rank: int = 128
    lora_rank: int = 4
    seed: int = 0
    learning_rates: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"full": 3e-3, "lora": 1e-2, "vera": 3e-2, "dvora": 3e-2}
    )

    def label(self, method: str) -> str:
        """The method's name in tables and plots."""
        return {
            "full": "Full fine-tuning",
            "lora": f"LoRA (r={self.lora_rank})",
            "vera": f"VeRA (r={self.vera_rank})",
            "dvora": f"DVoRA (r={self.vera_rank})",
        }[method]


@dataclasses.dataclass
class Setup:
    """A network ready to train."""

    net: Any
    params: dict[str, Any]
    save: Callable[[Path], object]
    """Writes the trained parameters (the adapter, or the whole model for full fine-tuning)."""
    file_name: str
    lr: float


def _save_host(
    tensors: Callable[[], Mapping[str, Any]], to_host: Callable[[Any], np.ndarray]
) -> Callable[[Path], None]:
    def save(path: Path) -> None:
        from safetensors.numpy import save_file

        host = {name: np.ascontiguousarray(to_host(value)) for name, value in tensors().items()}
        write_file(path, lambda tmp: save_file(host, tmp))

    return save


def build(method: str, weights: Mapping[str, Any], settings: Settings, to_host: Callable[[Any], np.ndarray]) -> Setup:
    """The network and trainable parameters of ``method`` over the frozen ``weights``.

    Parameters
    ----------
    method : {"full", "lora", "vera", "dvora"}
    weights : mapping of str to array
        The pretrained weights on the device; never modified.
    settings : Settings
    to_host : callable
        Device array to NumPy, for saving.
    """
    import vera_numpy as vn

    lr = settings.learning_rates[method]
    if method == "full":
        net = network(lambda name: vn.Linear(weights[f"{name}.weight"], weights[f"{name}.bias"]), vn.ReLU)
        return Setup(net, net.parameters(), _save_host(net.parameters, to_host), "full.safetensors", lr)
    if method == "lora":
        rng = np.random.default_rng(settings.seed)
        net = network(
            lambda name: LoraLinear(
                weights[f"{name}.weight"],
                weights[f"{name}.bias"],
                rank=settings.lora_rank,
                alpha=2.0 * settings.lora_rank,
                rng=rng,
            ),
            vn.ReLU,
        )
        return Setup(net, net.parameters(), _save_host(net.parameters, to_host), "lora.safetensors", lr)
    if method in ("vera", "dvora"):
        model = vn.add_vera(weights, list(LAYERS), r=settings.vera_rank, seed=settings.seed, dvora=method == "dvora")
        net = network(model.layer, vn.ReLU)
        return Setup(net, model.parameters(), lambda path: model.save(path), f"{method}.safetensors", lr)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
