"""The analytic backward of every backend against torch.autograd and jax.grad of the forward in plain ops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from vera_core.testing import Case, Layer
from vera_core.testing.adapter_checks import adapter_grads, compare_grads

from .host import dtypes

CASE = Case(batch=(2, 3), dropout=True, bias=True, fan_in_fan_out=True, seed=7)


def plain_loss(v: dict[str, Any], method: str, case: Case, stop_gradient: Callable[[Any], Any] | None) -> Any:
    """``sum(grad * y)`` written with operators only, for torch tensors and JAX arrays alike.

    ``v`` holds the oracle layout (``W`` (out, in), token rows); ``stop_gradient`` holds
    the DVoRA norm constant (None: exact).
    """
    r, n_in, n_out = case.rank, case.in_features, case.out_features
    A, B = v["A"][:r, :n_in], v["B"][:n_out, :r]
    delta = (v["b"][:, None] * B * v["d"][None, :]) @ A
    z = v["x"] @ v["W"].T + (v["x"] * v["mask"]) @ delta.T
    if method == "dvora":
        norm = (((v["W"] + delta) ** 2).sum(axis=1)) ** 0.5
        z = v["m"] / (norm if stop_gradient is None else stop_gradient(norm)) * z
    return (v["grad"] * (z + v["bias"])).sum()


def torch_grads(values: dict[str, np.ndarray], names: tuple[str, ...], method: str, detach: bool) -> dict[str, Any]:
    import torch

    tensors = {k: torch.tensor(a, dtype=torch.float64, requires_grad=k in names) for k, a in values.items()}
    plain_loss(tensors, method, CASE, (lambda t: t.detach()) if detach else None).backward()
    return {name: tensors[name].grad.tolist() for name in names}


def jax_grads(values: dict[str, np.ndarray], names: tuple[str, ...], method: str, detach: bool) -> dict[str, Any]:
    import jax

    jax.config.update("jax_enable_x64", True)
    arrays = {k: jax.numpy.asarray(a, dtype=jax.numpy.float64) for k, a in values.items()}

    def loss(trainable: dict[str, Any]) -> Any:
        return plain_loss({**arrays, **trainable}, method, CASE, jax.lax.stop_gradient if detach else None)

    grads = jax.grad(loss)({name: arrays[name] for name in names})
    return {name: np.asarray(grads[name]).tolist() for name in names}


ORACLES = [
    pytest.param(torch_grads, id="torch.autograd", marks=pytest.mark.requires("torch")),
    pytest.param(jax_grads, id="jax.grad", marks=pytest.mark.requires("jax")),
]
MODES = {"vera": ("vera", False), "dvora": ("dvora", False), "dvora-detached": ("dvora", True)}


@pytest.mark.parametrize("dtype", dtypes("float32", "float64"))
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("oracle", ORACLES)
def test_backward_matches_autodiff(xp: Any, device: Any, oracle: Any, mode: tuple[str, bool], dtype: str) -> None:
    method, detach = mode
    layer = Layer.build(CASE, xp, device, dtype)
    names = layer.grad_names(method)
    expected = oracle({k: np.asarray(v, dtype=np.float64) for k, v in layer.values.items()}, names, method, detach)
    actual = adapter_grads(layer, method, detach_norm=detach)
    compare_grads(layer, method, actual, expected, layer.grad_tolerances(method, detach_norm=detach), "autodiff")
