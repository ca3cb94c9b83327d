"""Optimisers, gradient clipping and the schedule against reference formulas and torch.optim."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from vera_numpy import SGD, AdamW, WarmupCosine, clip_grad_norm

from .array_backend_helpers import from_numpy, to_numpy

SHAPES = {"a": (3,), "b": (2, 2)}
STEPS = 5
SGD_CASES = [
    {"momentum": 0.0},
    {"momentum": 0.9, "weight_decay": 0.01},
    {"momentum": 0.9, "dampening": 0.3},
    {"momentum": 0.8, "nesterov": True, "weight_decay": 0.1},
]
ADAMW_CASES = [{}, {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}]


def start_and_grads(seed: int = 0) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    start = {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}
    grads = [{name: rng.standard_normal(shape) for name, shape in SHAPES.items()} for _ in range(STEPS)]
    return start, grads


def run(xp: Any, optimizer_class: Any, options: dict[str, Any], lr: float = 0.05) -> dict[str, np.ndarray]:
    start, grads = start_and_grads()
    params = {name: from_numpy(xp, value) for name, value in start.items()}
    optimizer = optimizer_class(params, lr, **options)
    for step_grads in grads:
        optimizer.step({name: from_numpy(xp, g) for name, g in step_grads.items()})
    return {name: to_numpy(value) for name, value in params.items()}


def reference_sgd(
    lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False
) -> dict[str, np.ndarray]:
    params, grads = start_and_grads()
    buffers: dict[str, np.ndarray] = {}
    for step_grads in grads:
        for name, g in step_grads.items():
            g = g + weight_decay * params[name]
            if momentum:
                buffers[name] = g if name not in buffers else momentum * buffers[name] + (1 - dampening) * g
                g = g + momentum * buffers[name] if nesterov else buffers[name]
            params[name] = params[name] - lr * g
    return params


def reference_adamw(
    lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2
) -> dict[str, np.ndarray]:
    params, grads = start_and_grads()
    m = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    v = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    for t, step_grads in enumerate(grads, start=1):
        for name, g in step_grads.items():
            m[name] = betas[0] * m[name] + (1 - betas[0]) * g
            v[name] = betas[1] * v[name] + (1 - betas[1]) * g * g
            m_hat, v_hat = m[name] / (1 - betas[0] ** t), v[name] / (1 - betas[1] ** t)
            params[name] = params[name] * (1 - lr * weight_decay) - lr * m_hat / (np.sqrt(v_hat) + eps)
    return params


def assert_same(got: dict[str, np.ndarray], expected: dict[str, Any]) -> None:
    for name in SHAPES:
        np.testing.assert_allclose(got[name], np.asarray(expected[name]), rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("options", SGD_CASES)
def test_sgd_matches_reference(xp: Any, options: dict[str, Any]) -> None:
    assert_same(run(xp, SGD, options), reference_sgd(0.05, **options))


@pytest.mark.parametrize("options", ADAMW_CASES)
def test_adamw_matches_reference(xp: Any, options: dict[str, Any]) -> None:
    assert_same(run(xp, AdamW, options), reference_adamw(0.05, **options))


@pytest.mark.parametrize(("name", "options"), [("SGD", o) for o in SGD_CASES] + [("AdamW", o) for o in ADAMW_CASES])
@pytest.mark.requires("torch")
def test_matches_torch_optim(name: str, options: dict[str, Any]) -> None:
    import array_api_compat.numpy as xp
    import torch

    start, grads = start_and_grads()
    params = {key: torch.nn.Parameter(torch.tensor(value)) for key, value in start.items()}
    optimizer = getattr(torch.optim, name)(list(params.values()), lr=0.05, **options)
    for step_grads in grads:
        for key, g in step_grads.items():
            params[key].grad = torch.tensor(g)
        optimizer.step()
    ours = run(xp, {"SGD": SGD, "AdamW": AdamW}[name], options)
    assert_same(ours, {key: p.detach().numpy() for key, p in params.items()})


@pytest.mark.parametrize("optimizer_class", [SGD, AdamW])
def test_state_dict_round_trip(xp: Any, optimizer_class: Any) -> None:
    start, grads = start_and_grads(1)
    options = {"momentum": 0.9} if optimizer_class is SGD else {}
    params = {name: from_numpy(xp, value) for name, value in start.items()}
    first = optimizer_class(params, 0.1, **options)
    for step_grads in grads[:3]:
        first.step({name: from_numpy(xp, g) for name, g in step_grads.items()})
    checkpoint = first.state_dict()
    saved_params = {name: to_numpy(value) for name, value in params.items()}
    for step_grads in grads[3:]:
        first.step({name: from_numpy(xp, g) for name, g in step_grads.items()})

    resumed_params = {name: from_numpy(xp, value) for name, value in saved_params.items()}
    second = optimizer_class(resumed_params, 0.5, **options)
    second.load_state_dict(checkpoint)
    assert second.lr == 0.1
    for step_grads in grads[3:]:
        second.step({name: from_numpy(xp, g) for name, g in step_grads.items()})
    for name in SHAPES:
        np.testing.assert_array_equal(to_numpy(resumed_params[name]), to_numpy(params[name]))


def test_parameters_without_gradient_are_left_alone(xp: Any) -> None:
    params = {"a": from_numpy(xp, np.ones(2)), "b": from_numpy(xp, np.ones(2))}
    optimizer = AdamW(params, 0.1)
    optimizer.step({"a": from_numpy(xp, np.ones(2))})
    assert to_numpy(params["b"]).tolist() == [1.0, 1.0]
    assert "b" not in optimizer.state_dict()["state"]


def test_clip_grad_norm(xp: Any) -> None:
    grads = {"a": from_numpy(xp, np.array([3.0, 0.0])), "b": from_numpy(xp, np.array([[4.0]]))}
    assert float(clip_grad_norm(grads, 10.0)) == pytest.approx(5.0)
    assert to_numpy(grads["a"]).tolist() == [3.0, 0.0]
    assert float(clip_grad_norm(grads, 1.0)) == pytest.approx(5.0)
    np.testing.assert_allclose(to_numpy(grads["a"]), [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(grads["b"]), [[0.8]], rtol=1e-6)


@pytest.mark.requires("torch")
def test_clip_grad_norm_matches_torch() -> None:
    import torch

    rng = np.random.default_rng(2)
    values = [rng.standard_normal(shape).astype(np.float32) for shape in ((4,), (3, 2))]
    ours = {str(i): value.copy() for i, value in enumerate(values)}
    norm = clip_grad_norm(ours, 0.5)
    tensors = [torch.nn.Parameter(torch.zeros(v.shape)) for v in values]
    for tensor, value in zip(tensors, values, strict=True):
        tensor.grad = torch.tensor(value)
    expected = torch.nn.utils.clip_grad_norm_(tensors, 0.5)
    assert float(norm) == pytest.approx(float(expected), rel=1e-6)
    for i, tensor in enumerate(tensors):
        np.testing.assert_allclose(ours[str(i)], tensor.grad.numpy(), rtol=1e-6)


def test_warmup_cosine_values() -> None:
    schedule = WarmupCosine(2.0, warmup_steps=4, total_steps=14, final_lr=0.5)
    assert [schedule(t) for t in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert schedule(9) == pytest.approx(0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(14) == pytest.approx(0.5)
    assert schedule(100) == pytest.approx(0.5)
    optimizer = SGD({"w": np.zeros(1)}, lr=0.0)
    assert schedule.apply(optimizer, 2) == 1.0
    assert optimizer.lr == 1.0


def test_optimiser_and_schedule_errors() -> None:
    params = {"w": np.zeros(2)}
    with pytest.raises(ValueError, match="no parameters"):
        SGD({}, lr=0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        SGD(params, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        AdamW(params, betas=(0.9, 1.0))
    optimizer = AdamW(params)
    with pytest.raises(KeyError, match="unknown parameters: v"):
        optimizer.step({"v": np.zeros(2)})
    with pytest.raises(ValueError, match=r"gradient 'w' has shape \(3,\)"):
        optimizer.step({"w": np.zeros(3)})
    with pytest.raises(KeyError, match="state for unknown parameters"):
        optimizer.load_state_dict(
            {"lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0, "state": {"v": {}}}
        )
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        WarmupCosine(1.0, warmup_steps=5, total_steps=5)
    with pytest.raises(ValueError, match="no gradients"):
        clip_grad_norm({}, 1.0)
