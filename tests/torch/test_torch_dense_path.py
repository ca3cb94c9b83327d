"""VeraLinear takes the merged-weight path exactly where it is cheaper and valid, with equal results."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import vera_torch as vt  # noqa: E402
import vera_torch.layers as layers  # noqa: E402

TOKENS = 4096
"""Enough tokens for the merged weight to save more than ``vera_core.DENSE_MIN_SAVING`` multiply-adds."""


def _model(dropout: float = 0.0, **options: Any) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    vt.add_vera(model, target_modules="all-linear", r=8, seed=3, dropout=dropout, **options)
    for name, parameter in model.named_parameters():
        if "lambda" in name:
            nn.init.normal_(parameter)
    return model


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y.square().sum()).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return y.detach(), [x.grad, *grads]


def _count_calls(monkeypatch: pytest.MonkeyPatch, function_name: str) -> list[int]:
    """Replace ``layers.<function_name>`` by a wrapper that records each call."""
    calls: list[int] = []
    original = getattr(layers, function_name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(layers, function_name, counting)
    return calls


def _dense_then_factored(monkeypatch: pytest.MonkeyPatch, calls: list[int], run: Callable[[], Any]) -> tuple[Any, Any]:
    """``run()`` once on the merged-weight path (checked taken), then with that path turned off."""
    dense = run()
    assert calls == [1]
    monkeypatch.setattr(layers.vc, "dense_is_cheaper", lambda *a, **k: False)
    factored = run()
    assert calls == [1]
    return dense, factored


@pytest.fixture
def dense_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return _count_calls(monkeypatch, "vera_dense")


def test_many_tokens_take_the_dense_path_with_equal_results(
    dense_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(TOKENS, 32, dtype=torch.float32)
    (y_dense, grads_dense), (y_factored, grads_factored) = _dense_then_factored(
        monkeypatch, dense_calls, lambda: _run(_model(), x)
    )
    torch.testing.assert_close(y_dense, y_factored, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_dense, grads_factored, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_few_tokens_and_dropout_stay_factored(dense_calls: list[int]) -> None:
    _run(_model(), torch.randn(1, 32))
    _run(_model(dropout=0.1).train(), torch.randn(64, 32))
    assert dense_calls == []


@pytest.mark.parametrize("how", ["autocast", "bfloat16 model"])
def test_bfloat16_takes_the_dense_path_with_close_results(
    dense_calls: list[int], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """16-bit activations use the merged weight too (rounded once): about as accurate as the factored form."""
    x = torch.randn(TOKENS, 32, generator=torch.Generator().manual_seed(1))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = _model()
        if how == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _run(model, x)
        return _run(model.to(torch.bfloat16), x.to(torch.bfloat16))

    (y_dense, grads_dense), (y_factored, grads_factored) = _dense_then_factored(monkeypatch, dense_calls, run)
    assert y_dense.dtype == torch.bfloat16
    y_exact, grads_exact = _run(_model().double(), x.double())  # the same model in float64
    pairs = zip([y_dense, *grads_dense], [y_factored, *grads_factored], [y_exact, *grads_exact], strict=True)
    for dense, factored, exact in pairs:
        error, factored_error = (torch.linalg.norm(t.double() - exact) for t in (dense, factored))
        # bf16 keeps 8 significant bits: both forms are a few units of 2**-8 off, neither much worse
        assert error <= 3 * factored_error and error <= 3 * 2**-8 * torch.linalg.norm(exact), (error, factored_error)


@pytest.mark.parametrize("detach_norm", [False, True])
def test_dvora_takes_the_dense_path_with_equal_results(monkeypatch: pytest.MonkeyPatch, detach_norm: bool) -> None:
    """Both DVoRA paths are as close to the float64 model (sums over 4096 tokens in float32 round)."""
    calls = _count_calls(monkeypatch, "dvora_dense")
    x = torch.randn(TOKENS, 32)
    model = lambda: _model(dvora=True, bias="all", detach_norm=detach_norm)  # noqa: E731
    (y_dense, grads_dense), (y_factored, grads_factored) = _dense_then_factored(
        monkeypatch, calls, lambda: _run(model(), x)
    )
    y_exact, grads_exact = _run(model().double(), x.double())
    assert len(grads_dense) == 5  # x, bias, magnitude, lambda_d, lambda_b
    pairs = zip([y_dense, *grads_dense], [y_factored, *grads_factored], [y_exact, *grads_exact], strict=True)
    for dense, factored, exact in pairs:
        error, factored_error = (torch.linalg.norm(t.double() - exact) for t in (dense, factored))
        assert error <= 2 * factored_error + 1e-6 * torch.linalg.norm(exact), (error, factored_error)
        assert error <= 1e-4 * torch.linalg.norm(exact)
