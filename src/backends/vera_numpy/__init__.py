"""VeRA and DVoRA for array libraries without autograd (NumPy; CuPy through :mod:`vera_cupy`).

One implementation, generic over the Array API namespace of the arrays it is given
(NumPy, CuPy, array-api-strict, ...); all adapter math comes from :mod:`vera_core`.

The layer protocol
------------------
Every layer (:class:`Linear`, :class:`VeraLinear`, :class:`DVoraLinear`, :class:`ReLU`)
and container (:class:`Sequential`, :class:`AdaptedModel`) offers:

* ``forward(x) -> y``: computes the output and caches what ``backward`` needs;
* ``backward(grad_y, *, input_grad=True) -> grad_x``: *adds* the parameter gradients
  into ``grads()`` and returns ``dL/dx`` for chaining (``None`` with
  ``input_grad=False``); containers have no ``forward``/``backward`` except
  ``Sequential``;
* ``parameters() -> dict[str, array]``: the trainable arrays themselves (optimisers
  update them in place); containers prefix ``"<child>."``;
* ``grads() -> dict[str, array]``: the accumulated gradients, same names;
* ``zero_grad()``; ``train()`` / ``eval()`` (dropout only in training mode);
  ``load_parameters(values)`` copies values in place.

Frozen arrays (weights, projections) are never written to; trainable copies are made
where a frozen input becomes trainable (``Linear`` weights, trained biases). The
``parameters()`` of a trained ``Sequential`` of ``Linear`` layers is a weight
dictionary (``"<layer>.weight"``, ``"<layer>.bias"``) ready for :func:`add_vera`.

Training loop
-------------
>>> import numpy as np
>>> import vera_numpy as vn
>>> rng = np.random.default_rng(0)
>>> weights = {"fc1.weight": rng.standard_normal((16, 8), dtype=np.float32),
...            "fc1.bias": np.zeros(16, np.float32),
...            "fc2.weight": rng.standard_normal((3, 16), dtype=np.float32),
...            "fc2.bias": np.zeros(3, np.float32)}
>>> model = vn.add_vera(weights, ["fc1", "fc2"], r=8, seed=0)
>>> net = vn.Sequential({"fc1": model.layer("fc1"), "act": vn.ReLU(), "fc2": model.layer("fc2")})
>>> opt = vn.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
>>> schedule = vn.WarmupCosine(1e-2, warmup_steps=2, total_steps=20)
>>> x, labels = rng.standard_normal((32, 8), dtype=np.float32), rng.integers(0, 3, 32)
>>> for step in range(20):
...     model.zero_grad()
...     loss, dlogits = vn.softmax_cross_entropy(net.forward(x), labels)
...     _ = net.backward(dlogits, input_grad=False)
...     _ = vn.clip_grad_norm(model.grads(), 1.0)
...     _ = schedule.apply(opt, step)
...     opt.step(model.grads())
>>> merged = model.merge()  # a new weight dict; `weights` is unchanged
>>> sorted(merged) == sorted(weights)
True
"""

from vera_numpy._backend import Backend
from vera_numpy.bank import RowGrad
from vera_numpy.bank_layer import BASE_ADAPTER, BankLinear
from vera_numpy.bank_model import BankModel
from vera_numpy.container import Container, Sequential
from vera_numpy.layers import AdaptedLinear, DVoraLinear, Layer, Linear, ReLU, VeraLinear
from vera_numpy.loss import accuracy, softmax_cross_entropy
from vera_numpy.optim import SGD, AdamW, BankAdamW, Optimizer, clip_grad_norm
from vera_numpy.schedule import WarmupCosine
from vera_numpy.weights import AdaptedModel, add_vera, linear_layers

__all__ = [
    "BASE_ADAPTER",
    "SGD",
    "AdamW",
    "AdaptedLinear",
    "AdaptedModel",
    "Backend",
    "BankAdamW",
    "BankLinear",
    "BankModel",
    "Container",
    "DVoraLinear",
    "Layer",
    "Linear",
    "Optimizer",
    "ReLU",
    "RowGrad",
    "Sequential",
    "VeraLinear",
    "WarmupCosine",
    "accuracy",
    "add_vera",
    "clip_grad_norm",
    "linear_layers",
    "softmax_cross_entropy",
]
