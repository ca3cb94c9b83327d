"""CuPy: projections drawn on the GPU, training without host copies, files shared with NumPy.

Every test skips with the reason "no CUDA device" on machines without one. CuPy has no
transfer guard like JAX's, so "no hidden host copies" is checked two ways: the library's
only conversion points (``CupyBackend.to_host``/``from_host`` and ``cupy.asnumpy``) are
counted, and the step runs under ``cupyx.allow_synchronize(False)``, which raises on any
device synchronisation CuPy performs (every device-to-host copy synchronises).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vera_core as vc
from vera_numpy import (
    AdamW,
    AdaptedModel,
    ReLU,
    Sequential,
    WarmupCosine,
    add_vera,
    clip_grad_norm,
    softmax_cross_entropy,
)

from .array_backend_helpers import cupy_or_skip, train_a_little, weight_dict


@pytest.fixture
def cupy() -> Any:
    return cupy_or_skip()


@pytest.fixture
def vera_cupy(cupy: Any) -> Any:
    import vera_cupy

    return vera_cupy


def host_weights() -> dict[str, np.ndarray]:
    import array_api_compat.numpy as xp

    return {name: np.asarray(value, dtype=np.float32) for name, value in weight_dict(xp).items()}


def test_projections_are_drawn_on_the_gpu_and_match_numpy(cupy: Any, vera_cupy: Any) -> None:
    A, B = vera_cupy.generate_projections(5, 16, 300, 200)
    assert isinstance(A, cupy.ndarray) and isinstance(B, cupy.ndarray)
    A_host, B_host = vc.generate_projections(5, 16, 300, 200, xp=np)
    np.testing.assert_array_equal(A.get(), A_host)
    np.testing.assert_array_equal(B.get(), B_host)


class Counter:
    """Counts calls of the patched host-conversion functions."""

    def __init__(self) -> None:
        self.calls = 0

    def wrap(self, function: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return function(*args, **kwargs)

        return counted


@contextlib.contextmanager
def no_host_traffic(cupy: Any, vera_cupy: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter]:
    """Inside the block a synchronisation raises and host copies are counted (skips without the guard)."""
    import cupyx

    guard = getattr(cupyx, "allow_synchronize", None)
    if guard is None:
        pytest.skip("this CuPy has no cupyx.allow_synchronize")
    counter = Counter()
    monkeypatch.setattr(cupy, "asnumpy", counter.wrap(cupy.asnumpy))
    for method in ("to_host", "from_host"):
        monkeypatch.setattr(vera_cupy.CupyBackend, method, counter.wrap(getattr(vera_cupy.CupyBackend, method)))
    with guard(False):
        yield counter


def training_step(
    model: AdaptedModel, net: Sequential, optimizer: AdamW, schedule: WarmupCosine, X: Any, labels: Any, step: int
) -> Any:
    model.zero_grad()
    loss, dlogits = softmax_cross_entropy(net.forward(X), labels)
    net.backward(dlogits, input_grad=False)
    clip_grad_norm(model.grads(), 1.0)
    schedule.apply(optimizer, step)
    optimizer.step(model.grads())
    return loss


@pytest.mark.parametrize("dvora", [False, True])
def test_training_stays_on_the_device(cupy: Any, vera_cupy: Any, monkeypatch: pytest.MonkeyPatch, dvora: bool) -> None:
    model = vera_cupy.add_vera(host_weights(), "all-linear", r=4, dvora=dvora, bias="vera_only", dropout=0.1)
    net = Sequential({"a": model.layer("enc.0.fc"), "act": ReLU(), "b": model.layer("enc.1.fc")})
    rng = np.random.default_rng(0)
    X = cupy.asarray(rng.standard_normal((32, 5)).astype(np.float32))
    labels = cupy.asarray(rng.integers(0, 6, 32))
    optimizer = AdamW(model.parameters(), lr=0.01)
    schedule = WarmupCosine(0.01, 2, 10)
    training_step(model, net, optimizer, schedule, X, labels, 0)  # compiles the kernels
    cupy.cuda.Device().synchronize()

    with no_host_traffic(cupy, vera_cupy, monkeypatch) as counter:
        for step in range(1, 4):
            loss = training_step(model, net, optimizer, schedule, X, labels, step)
    assert counter.calls == 0
    arrays = [loss, *model.parameters().values(), *model.grads().values()]
    arrays += [v for entry in optimizer.state.values() for v in entry.values() if not isinstance(v, int)]
    assert all(isinstance(a, cupy.ndarray) and a.device == cupy.cuda.Device() for a in arrays)


def test_files_move_between_cupy_and_numpy(cupy: Any, vera_cupy: Any, tmp_path: Path) -> None:
    import array_api_compat.cupy as cxp
    import array_api_compat.numpy as nxp

    weights = host_weights()
    on_gpu = vera_cupy.add_vera(weights, ["fc"], r=4, seed=8, dvora=True)
    train_a_little(cxp, on_gpu)
    on_gpu.save(tmp_path / "gpu.safetensors")
    on_cpu = AdaptedModel.load(tmp_path / "gpu.safetensors", weights)
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    expected = on_cpu.layer("enc.0.fc").forward(x)
    np.testing.assert_allclose(on_gpu.layer("enc.0.fc").forward(cupy.asarray(x)).get(), expected, rtol=1e-5, atol=1e-5)

    cpu_model = add_vera(weights, ["fc"], r=4, seed=8)
    train_a_little(nxp, cpu_model, seed=2)
    cpu_model.save(tmp_path / "cpu.safetensors")
    gpu_model = vera_cupy.load_adapter(tmp_path / "cpu.safetensors", weights)
    np.testing.assert_allclose(
        gpu_model.layer("enc.0.fc").forward(cupy.asarray(x)).get(),
        cpu_model.layer("enc.0.fc").forward(x),
        rtol=1e-5,
        atol=1e-5,
    )
    merged = gpu_model.merge()
    assert all(isinstance(v, cupy.ndarray) for v in merged.values())


def test_bank_training_stays_on_the_device(cupy: Any, vera_cupy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed-batch VeRA bank step (trained biases, base rows): no host copy, no synchronisation.

    The selection (``model.use``) is made before: it copies the row index to the device once.
    """
    from vera_numpy import BankAdamW, BankModel

    model = BankModel(vera_cupy.to_device(host_weights()))
    for i in range(5):
        model.add_vera(f"u{i}", "all-linear", r=4 if i % 2 else 3, bias="vera_only" if i % 2 else "none")
    net = Sequential(
        {
            "a": model.layer("enc.0.fc"),
            "act": ReLU(),
            "b": model.layer("enc.1.fc"),
            "act2": ReLU(),
            "c": model.layer("head"),
        }
    )
    rng = np.random.default_rng(0)
    X = cupy.asarray(rng.standard_normal((32, 5)).astype(np.float32))
    labels = cupy.asarray(rng.integers(0, 3, 32))
    optimizer = BankAdamW(model, lr=0.01)
    model.use(["u0", "u1", "u2", "u3", "u4", "u0", "__base__", "u3"] * 4)

    def step() -> Any:
        model.zero_grad()
        loss, dlogits = softmax_cross_entropy(net.forward(X), labels)
        net.backward(dlogits, input_grad=False)
        optimizer.step()
        return loss

    step()  # compiles the kernels
    cupy.cuda.Device().synchronize()
    with no_host_traffic(cupy, vera_cupy, monkeypatch) as counter:
        for _ in range(3):
            loss = step()
    assert counter.calls == 0
    arrays = [loss, *model.parameters().values(), *(g.values for g in model.grads().values())]
    arrays += [v for entry in optimizer.state.values() for v in entry.values()]
    assert all(isinstance(a, cupy.ndarray) and a.device == cupy.cuda.Device() for a in arrays)
    assert np.isfinite(float(loss))  # read after the guarded steps
