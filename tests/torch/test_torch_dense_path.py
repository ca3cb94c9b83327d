"""VeraLinear runs a plain frozen layer as one node, each pass merged exactly where cheaper, with equal results."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import vera_core as vc  # noqa: E402
import vera_torch as vt  # noqa: E402
import vera_torch.layers as layers  # noqa: E402

TOKENS = 16384
"""Enough tokens (32 -> 16, r = 8) for the merged forward to save ``vera_core.DENSE_MIN_SAVING`` multiply-adds."""


class SubclassedLinear(nn.Linear):
    """Not a plain ``nn.Linear`` (its forward could differ): the layer leaves it to autograd."""


def _model(dropout: float = 0.0, linear: type[nn.Linear] = nn.Linear, **options: Any) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(linear(32, 16))
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


def _record_passes(monkeypatch: pytest.MonkeyPatch, function_name: str) -> list[tuple[bool, bool]]:
    """Replace ``layers.<function_name>`` by one recording the ``merged`` passes of each call."""
    seen: list[tuple[bool, bool]] = []
    original = getattr(layers, function_name)

    class Recording:
        @staticmethod
        def apply(*args: Any) -> torch.Tensor:
            seen.append(tuple(args[-1]))
            return original.apply(*args)

    monkeypatch.setattr(layers, function_name, Recording)
    return seen


@pytest.fixture
def vera_passes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    return _record_passes(monkeypatch, "VeraLinearFunction")


def _force_factored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layers.vc, "merged_passes", lambda *a, **k: vc.MergedPasses(False, False))


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [(TOKENS, (True, True)), (4096, (False, True)), (64, None), (1, None)],
)
def test_each_pass_is_merged_where_it_is_cheaper(
    vera_passes: list[tuple[bool, bool]], tokens: int, expected: tuple[bool, bool] | None
) -> None:
    """32 -> 16, r = 8: merging saves 384 T - 4,096 multiply-adds in backward, 128 T - 4,096 in forward.

    Each pass merges from 2**20 saved (T = 2,742 and 8,224). With neither merged, VeRA stays
    the factored operators under autograd (no node of its own).
    """
    assert vc.merged_passes(tokens, 32, 16, 8) == (expected or (False, False))  # the rule, tested in tests/core
    model = _model()
    _run(model, torch.randn(tokens, 32))
    _run(model, torch.randn(tokens, 32))  # the remembered step (layers._Fast) chooses alike
    assert vera_passes == ([] if expected is None else [expected, expected])


def test_many_tokens_merge_both_passes_with_equal_results(
    vera_passes: list[tuple[bool, bool]], monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(TOKENS, 32, dtype=torch.float32)
    y_merged, grads_merged = _run(_model(), x)
    _force_factored(monkeypatch)
    y_factored, grads_factored = _run(_model(), x)
    assert vera_passes == [(True, True)]  # then the factored operators under autograd
    torch.testing.assert_close(y_merged, y_factored, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_merged, grads_factored, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.parametrize("dvora", [False, True])
def test_one_node_equals_autograd_through_the_core(dvora: bool, bias: str) -> None:
    """The whole-layer node and the factored path autograd derives (a base that is not plain) agree."""
    x = torch.randn(64, 32, dtype=torch.float64)
    y_node, grads_node = _run(_model(dvora=dvora, bias=bias).double(), x)
    y_autograd, grads_autograd = _run(_model(dvora=dvora, bias=bias, linear=SubclassedLinear).double(), x)
    torch.testing.assert_close(y_node, y_autograd, rtol=1e-12, atol=1e-12)
    assert len(grads_node) == len(grads_autograd) == 3 + dvora + (bias == "all")  # x, bias, m, lambda_d, lambda_b
    for got, want in zip(grads_node, grads_autograd, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_dropout_in_training_leaves_the_layer_to_autograd(vera_passes: list[tuple[bool, bool]]) -> None:
    _run(_model(dropout=0.1).train(), torch.randn(TOKENS, 32))
    assert vera_passes == []
    _run(_model(dropout=0.1).eval(), torch.randn(TOKENS, 32))  # no dropout in effect
    assert vera_passes == [(True, True)]


def test_a_trained_base_weight_leaves_the_layer_to_autograd(vera_passes: list[tuple[bool, bool]]) -> None:
    """Unfreezing the base after a step drops the remembered step: the weight gets its gradient."""
    model = _model()
    _run(model, torch.randn(TOKENS, 32))
    model[0].base_layer.weight.requires_grad_(True)
    _run(model, torch.randn(TOKENS, 32))
    assert vera_passes == [(True, True)]
    assert model[0].base_layer.weight.grad is not None


@pytest.mark.parametrize("how", ["autocast", "bfloat16 model"])
def test_bfloat16_merges_with_close_results(
    vera_passes: list[tuple[bool, bool]], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """16-bit activations use the merged weight too (rounded once): about as accurate as the factored form."""
    x = torch.randn(TOKENS, 32, generator=torch.Generator().manual_seed(1))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = _model()
        if how == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _run(model, x)
        return _run(model.to(torch.bfloat16), x.to(torch.bfloat16))

    y_merged, grads_merged = run()
    _force_factored(monkeypatch)
    y_factored, grads_factored = run()
    assert vera_passes == [(True, True)]  # then the factored operators under autograd
    assert y_merged.dtype == torch.bfloat16
    y_exact, grads_exact = _run(_model().double(), x.double())  # the same model in float64
    pairs = zip([y_merged, *grads_merged], [y_factored, *grads_factored], [y_exact, *grads_exact], strict=True)
    for merged, factored, exact in pairs:
        error, factored_error = (torch.linalg.norm(t.double() - exact) for t in (merged, factored))
        # bf16 keeps 8 significant bits: both forms are a few units of 2**-8 off, neither much worse
        assert error <= 3 * factored_error and error <= 3 * 2**-8 * torch.linalg.norm(exact), (error, factored_error)


@pytest.mark.parametrize("detach_norm", [False, True])
def test_dvora_merged_and_factored_are_equally_close(monkeypatch: pytest.MonkeyPatch, detach_norm: bool) -> None:
    """Both DVoRA forms are as close to the float64 model (sums over 16,384 tokens in float32 round)."""
    seen = _record_passes(monkeypatch, "DvoraLinearFunction")
    x = torch.randn(TOKENS, 32)
    model = lambda: _model(dvora=True, bias="all", detach_norm=detach_norm)  # noqa: E731
    y_merged, grads_merged = _run(model(), x)
    _force_factored(monkeypatch)
    y_factored, grads_factored = _run(model(), x)
    assert seen == [(True, True), (False, False)]
    y_exact, grads_exact = _run(model().double(), x.double())
    assert len(grads_merged) == 5  # x, bias, magnitude, lambda_d, lambda_b
    pairs = zip([y_merged, *grads_merged], [y_factored, *grads_factored], [y_exact, *grads_exact], strict=True)
    for merged, factored, exact in pairs:
        error, factored_error = (torch.linalg.norm(t.double() - exact) for t in (merged, factored))
        assert error <= 2 * factored_error + 1e-6 * torch.linalg.norm(exact), (error, factored_error)
        assert error <= 5e-4 * torch.linalg.norm(exact)  # float32 sums over 16,384 tokens with cancellation


@pytest.mark.parametrize("change", ["in place", "replaced"])
@pytest.mark.parametrize("dvora", [False, True])
@pytest.mark.parametrize("tokens", [64, TOKENS])
def test_a_changed_base_weight_is_followed(dvora: bool, change: str, tokens: int) -> None:
    """The remembered step (and DVoRA's Gram pieces) follow the base weight changed in place or replaced."""
    model = _model(dvora=dvora)
    layer = model[0]
    x = torch.randn(tokens, 32)
    _run(model, x)
    _run(model, x)  # the remembered step now serves
    with torch.no_grad():
        if change == "in place":
            layer.base_layer.weight.mul_(-2.0).add_(0.5)
        else:
            layer.base_layer.weight = nn.Parameter(layer.base_layer.weight * -2.0 + 0.5, requires_grad=False)
    model.zero_grad(set_to_none=True)
    y, grads = _run(model, x)
    fresh = _model(dvora=dvora)
    fresh.load_state_dict(model.state_dict())  # the same vectors on the changed weight, nothing remembered
    y_fresh, grads_fresh = _run(fresh, x)
    torch.testing.assert_close(y, y_fresh)
    for got, want in zip(grads, grads_fresh, strict=True):
        torch.testing.assert_close(got, want)
