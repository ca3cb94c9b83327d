"""Layers and Sequential: analytic gradients against central finite differences (float64)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import vera_core as vc
from vera_numpy import DVoraLinear, Linear, ReLU, Sequential, VeraLinear

from .array_backend_helpers import from_numpy, numerical_grad, to_numpy

R, MAX_IN, MAX_OUT = 4, 6, 5


def projections(xp: Any) -> tuple[Any, Any]:
    return vc.generate_projections(7, R, MAX_IN, MAX_OUT, xp=xp)


def randn(xp: Any, rng: np.random.Generator, *shape: int) -> Any:
    return from_numpy(xp, rng.standard_normal(shape))


def randomise(xp: Any, layer: Any, rng: np.random.Generator) -> None:
    """Move the parameters off their initial values (lambda_b = 0 would hide terms)."""
    values = {name: from_numpy(xp, rng.uniform(0.5, 1.5, p.shape)) for name, p in layer.parameters().items()}
    layer.load_parameters(values)


def check_gradients(xp: Any, layer: Any, x: Any, rng: np.random.Generator, before_forward: Any = None) -> None:
    """Every parameter gradient and dL/dx of ``loss = sum(layer(x) * R)`` against finite differences."""
    prepare = before_forward or (lambda: None)
    prepare()
    y = layer.forward(x)
    weights = randn(xp, rng, *y.shape)

    def loss() -> Any:
        prepare()
        return xp.sum(layer.forward(x) * weights)

    layer.zero_grad()
    prepare()
    layer.forward(x)
    grad_x = layer.backward(weights)
    grads = layer.grads()
    assert sorted(grads) == sorted(layer.parameters())
    for name, param in layer.parameters().items():
        np.testing.assert_allclose(
            to_numpy(grads[name]), numerical_grad(loss, param, xp), rtol=1e-6, atol=1e-8, err_msg=name
        )
    np.testing.assert_allclose(to_numpy(grad_x), numerical_grad(loss, x, xp), rtol=1e-6, atol=1e-8, err_msg="x")


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_gradients(xp: Any, fan_in_fan_out: bool) -> None:
    rng = np.random.default_rng(0)
    weight = randn(xp, rng, *((6, 5) if fan_in_fan_out else (5, 6)))
    layer = Linear(weight, randn(xp, rng, 5), fan_in_fan_out=fan_in_fan_out)
    check_gradients(xp, layer, randn(xp, rng, 2, 3, 6), rng)


PASSES = pytest.mark.parametrize(
    "passes", [(False, False), (True, True), (False, True)], ids=["factored", "merged-weight", "merged-backward"]
)


@PASSES
@pytest.mark.parametrize(("fan_in_fan_out", "train_bias", "rank"), [(False, False, R), (True, True, 3)])
def test_vera_gradients(
    xp: Any,
    fan_in_fan_out: bool,
    train_bias: bool,
    rank: int,
    passes: tuple[bool, bool],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every formulation of VeraLinear (the layer picks per pass by cost; here forced) against finite differences."""
    monkeypatch.setattr(vc, "merged_passes", lambda *args, **kwargs: vc.MergedPasses(*passes))
    rng = np.random.default_rng(1)
    A, B = projections(xp)
    weight = randn(xp, rng, *((5, 4) if fan_in_fan_out else (4, 5)))
    layer = VeraLinear(
        weight, A, B, bias=randn(xp, rng, 4), rank=rank, train_bias=train_bias, fan_in_fan_out=fan_in_fan_out
    )
    randomise(xp, layer, rng)
    check_gradients(xp, layer, randn(xp, rng, 3, 5), rng)


@PASSES
@pytest.mark.parametrize(("fan_in_fan_out", "train_bias"), [(False, True), (True, False)])
def test_dvora_gradients(
    xp: Any, fan_in_fan_out: bool, train_bias: bool, passes: tuple[bool, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every formulation of DVoraLinear (forced here) against finite differences."""
    monkeypatch.setattr(vc, "merged_passes", lambda *args, **kwargs: vc.MergedPasses(*passes))
    rng = np.random.default_rng(2)
    A, B = projections(xp)
    weight = randn(xp, rng, *((6, 5) if fan_in_fan_out else (5, 6)))
    layer = DVoraLinear(weight, A, B, bias=randn(xp, rng, 5), train_bias=train_bias, fan_in_fan_out=fan_in_fan_out)
    randomise(xp, layer, rng)
    check_gradients(xp, layer, randn(xp, rng, 2, 2, 6), rng)


def test_dvora_detached_norm_keeps_magnitude_gradient(xp: Any) -> None:
    rng = np.random.default_rng(3)
    A, B = projections(xp)
    weight, x, grad_y = randn(xp, rng, 5, 6), randn(xp, rng, 3, 6), randn(xp, rng, 3, 5)
    grads = []
    for detach in (False, True):
        layer = DVoraLinear(weight, A, B, detach_norm=detach)
        randomise(xp, layer, np.random.default_rng(4))
        layer.forward(x)
        layer.backward(grad_y)
        grads.append({name: to_numpy(g) for name, g in layer.grads().items()})
    np.testing.assert_allclose(grads[0]["magnitude"], grads[1]["magnitude"])
    assert not np.allclose(grads[0]["lambda_d"], grads[1]["lambda_d"])


def test_dropout_gradients_and_masks(xp: Any) -> None:
    rng = np.random.default_rng(5)
    A, B = projections(xp)
    layer = VeraLinear(randn(xp, rng, 5, 6), A, B, dropout=0.5, seed=3)
    randomise(xp, layer, rng)

    def same_mask() -> None:
        layer._draws = 0  # replay the first mask for every evaluation

    check_gradients(xp, layer, randn(xp, rng, 4, 6), rng, before_forward=same_mask)
    mask = to_numpy(layer._dropout_mask(from_numpy(xp, np.ones((200, 6)))))
    assert set(np.unique(mask)) == {0.0, 2.0}
    assert 0.4 < float(np.mean(mask == 0.0)) < 0.6
    assert not np.array_equal(mask, to_numpy(layer._dropout_mask(from_numpy(xp, np.ones((200, 6))))))


def test_eval_mode_disables_dropout(xp: Any) -> None:
    rng = np.random.default_rng(6)
    A, B = projections(xp)
    weight, x = randn(xp, rng, 5, 6), randn(xp, rng, 3, 6)
    plain, dropped = VeraLinear(weight, A, B), VeraLinear(weight, A, B, dropout=0.9)
    values = {name: from_numpy(xp, rng.uniform(0.5, 1.5, p.shape)) for name, p in plain.parameters().items()}
    plain.load_parameters(values)
    dropped.load_parameters(values)
    np.testing.assert_allclose(to_numpy(dropped.eval().forward(x)), to_numpy(plain.forward(x)))
    assert not np.allclose(to_numpy(dropped.train().forward(x)), to_numpy(plain.forward(x)))


def test_sequential_gradients(xp: Any) -> None:
    rng = np.random.default_rng(7)
    A, B = projections(xp)
    net = Sequential(
        {
            "fc1": Linear(randn(xp, rng, 6, 5), randn(xp, rng, 6)),
            "act": ReLU(),
            "vera": VeraLinear(randn(xp, rng, 5, 6), A, B, bias=randn(xp, rng, 5)),
            "dvora": DVoraLinear(randn(xp, rng, 4, 5), A, B, bias=randn(xp, rng, 4), train_bias=True),
        }
    )
    randomise(xp, net.children["vera"], rng)
    randomise(xp, net.children["dvora"], rng)
    assert sorted(net.parameters()) == [
        "dvora.bias",
        "dvora.lambda_b",
        "dvora.lambda_d",
        "dvora.magnitude",
        "fc1.bias",
        "fc1.weight",
        "vera.lambda_b",
        "vera.lambda_d",
    ]
    check_gradients(xp, net, randn(xp, rng, 3, 5), rng)


def test_adapted_layers_start_unchanged(xp: Any) -> None:
    rng = np.random.default_rng(8)
    A, B = projections(xp)
    weight, bias, x = randn(xp, rng, 5, 6), randn(xp, rng, 5), randn(xp, rng, 3, 6)
    expected = to_numpy(vc.linear(x, weight, bias))
    for layer in (VeraLinear(weight, A, B, bias=bias), DVoraLinear(weight, A, B, bias=bias)):
        np.testing.assert_allclose(to_numpy(layer.forward(x)), expected, rtol=1e-12, atol=1e-12)


def test_gradients_accumulate_until_zero_grad(xp: Any) -> None:
    rng = np.random.default_rng(9)
    A, B = projections(xp)
    layer = VeraLinear(randn(xp, rng, 5, 6), A, B)
    x, grad_y = randn(xp, rng, 3, 6), randn(xp, rng, 3, 5)
    layer.forward(x)
    layer.backward(grad_y, input_grad=False)
    once = to_numpy(layer.grads()["lambda_d"])
    layer.forward(x)
    assert layer.backward(grad_y, input_grad=False) is None
    np.testing.assert_allclose(to_numpy(layer.grads()["lambda_d"]), 2 * once)
    layer.zero_grad()
    assert layer.grads() == {}


def test_float16_weights_get_float32_vectors() -> None:
    A, B = vc.generate_projections(0, R, MAX_IN, MAX_OUT, xp=np)
    layer = DVoraLinear(np.ones((5, 6), np.float16), A, B)
    assert {p.dtype for p in layer.parameters().values()} == {np.dtype(np.float32)}
    y = layer.forward(np.ones((2, 6), np.float16))
    assert y.dtype == np.float16
    assert layer.backward(np.ones((2, 5), np.float16)).dtype == np.float16


def test_layer_errors(xp: Any) -> None:
    rng = np.random.default_rng(10)
    A, B = projections(xp)
    layer = VeraLinear(randn(xp, rng, 5, 6), A, B)
    with pytest.raises(RuntimeError, match="backward called before forward"):
        layer.backward(randn(xp, rng, 2, 5))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 6\)"):
        layer.forward(randn(xp, rng, 2, 4))
    with pytest.raises(ValueError, match="no bias"):
        VeraLinear(randn(xp, rng, 5, 6), A, B, train_bias=True)
    with pytest.raises(ValueError, match="input features but the shared A has only 6 columns"):
        VeraLinear(randn(xp, rng, 5, 9), A, B).forward(randn(xp, rng, 2, 9))
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 4\]"):
        DVoraLinear(randn(xp, rng, 5, 6), A, B, rank=5)
    with pytest.raises(ValueError, match="dropout must be in"):
        VeraLinear(randn(xp, rng, 5, 6), A, B, dropout=1.0)
    with pytest.raises(KeyError, match="no parameters named weight"):
        layer.load_parameters({"weight": randn(xp, rng, 5, 6)})
    with pytest.raises(ValueError, match="'lambda_d' has shape"):
        layer.load_parameters({"lambda_d": randn(xp, rng, 3)})
    with pytest.raises(TypeError, match="Sequential takes Layer objects"):
        Sequential(layer, "relu")
