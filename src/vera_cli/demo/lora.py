"""A minimal LoRA layer for the demo's baseline (not part of the library).

``y = x W^T + b + (alpha / r) (x A^T) B^T`` with ``A`` (r, in) drawn as PEFT draws it
(Kaiming-uniform with ``a = sqrt(5)``, bound ``1 / sqrt(in)``) and ``B`` (out, r) zero,
both trained; ``W`` and ``b`` frozen.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as device_of

import vera_core as vc
from vera_numpy import Layer


class LoraLinear(Layer):
    """A frozen dense layer plus a trained low-rank update ``(alpha / r) B A``.

    Parameters
    ----------
    weight : array, shape (out, in)
        Frozen.
    bias : array, shape (out,), optional
        Frozen.
    rank : int
        ``r``.
    alpha : float
        The scaling numerator (PEFT's ``lora_alpha``).
    rng : numpy.random.Generator
        Draws ``A`` (on the host; copied to the weight's device).

    Examples
    --------
    >>> W = np.ones((6, 8), np.float32)
    >>> layer = LoraLinear(W, None, rank=2, alpha=4.0, rng=np.random.default_rng(0))
    >>> bool(np.allclose(layer.forward(np.ones((3, 8), np.float32)), 8.0))
    True
    >>> layer.backward(np.ones((3, 6), np.float32)).shape, sorted(layer.grads())
    ((3, 8), ['lora_A', 'lora_B'])
    """

    def __init__(self, weight: Any, bias: Any, *, rank: int, alpha: float, rng: np.random.Generator) -> None:
        super().__init__()
        xp = array_namespace(weight)
        out_features, in_features = weight.shape
        bound = 1.0 / math.sqrt(in_features)
        host_A = rng.uniform(-bound, bound, (rank, in_features)).astype(np.float32)
        self.xp, self.weight, self.bias = xp, weight, bias
        self.scaling = alpha / rank
        self._params["lora_A"] = xp.asarray(host_A, dtype=weight.dtype, device=device_of(weight))
        self._params["lora_B"] = xp.zeros((out_features, rank), dtype=weight.dtype, device=device_of(weight))
        self._x: Any = None
        self._u: Any = None

    def forward(self, x: Any) -> Any:
        self._x = x
        self._u = self.xp.matmul(x, self._params["lora_A"].T)
        update = self.xp.matmul(self._u, self._params["lora_B"].T)
        return vc.linear(x, self.weight, self.bias) + self.scaling * update

    def backward(self, grad_y: Any, *, input_grad: bool = True) -> Any:
        xp, x, u = self.xp, self._saved(self._x), self._saved(self._u)
        A, B = self._params["lora_A"], self._params["lora_B"]
        grad_u = self.scaling * xp.matmul(grad_y, B)
        self._accumulate("lora_B", self.scaling * xp.matmul(grad_y.T, u))
        self._accumulate("lora_A", xp.matmul(grad_u.T, x))
        if not input_grad:
            return None
        return vc.linear_input_grad(grad_y, self.weight) + xp.matmul(grad_u, A)
