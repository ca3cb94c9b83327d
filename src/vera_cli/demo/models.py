"""The demo's network: a multilayer perceptron ``fc1 -> ReLU -> fc2 -> ReLU -> head`` on a weight dict."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

LAYERS = ("fc1", "fc2", "head")
"""The dense layers, in order; every method adapts all three."""


def init_weights(sizes: tuple[int, ...], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Host float32 weights for the layer sizes, initialised as ``torch.nn.Linear`` does.

    Examples
    --------
    >>> w = init_weights((64, 32, 32, 10), np.random.default_rng(0))
    >>> w["fc1.weight"].shape, w["head.bias"].shape
    ((32, 64), (10,))
    """
    weights = {}
    for name, fan_in, fan_out in zip(LAYERS, sizes[:-1], sizes[1:], strict=True):
        bound = 1.0 / math.sqrt(fan_in)
        weights[f"{name}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
        weights[f"{name}.bias"] = rng.uniform(-bound, bound, fan_out).astype(np.float32)
    return weights


def network(layer: Callable[[str], Any], relu: Callable[[], Any]) -> Any:
    """The MLP as a :class:`vera_numpy.Sequential` of ``layer(name)`` with ReLUs between."""
    from vera_numpy import Sequential

    return Sequential(
        {"fc1": layer("fc1"), "relu1": relu(), "fc2": layer("fc2"), "relu2": relu(), "head": layer("head")}
    )


def parameter_count(params: Mapping[str, Any]) -> int:
    """Total number of elements of the trainable arrays."""
    return int(sum(math.prod(value.shape) for value in params.values()))
