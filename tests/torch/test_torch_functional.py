"""The autograd Functions against plain autograd on the textbook formulas."""

import pytest

torch = pytest.importorskip("torch")

from array_api_compat import torch as xp  # noqa: E402

import vera_core as vc  # noqa: E402
from vera_torch.functional import dvora, dvora_linear, vera, vera_linear  # noqa: E402


def _setup(dtype=torch.float64, r=6, R=8, n_in=10, n_out=7, max_in=12, max_out=9):
    A, B = vc.generate_projections(3, R, max_in, max_out, xp=xp, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(n_out, n_in, generator=g, dtype=dtype)
    x = torch.randn(2, 5, n_in, generator=g, dtype=dtype, requires_grad=True)
    d = torch.randn(r, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(n_out, generator=g, dtype=dtype, requires_grad=True)
    return A, B, W, x, d, b


def _assert_same(y, ref, inputs):
    """``y`` equals ``ref``, and so do their gradients with respect to ``inputs`` for a random upstream gradient."""
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, g)
    want = torch.autograd.grad(ref, inputs, g)
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w)


def _reference_vera(x, W, A, B, d, b, mask=None):
    r, n_out, n_in = d.shape[0], b.shape[0], x.shape[-1]
    xd = x if mask is None else x * mask
    return x @ W.T + b * ((d * (xd @ A[:r, :n_in].T)) @ B[:n_out, :r].T)


@pytest.mark.parametrize("use_mask", [False, True])
def test_vera_matches_autograd(use_mask):
    A, B, W, x, d, b = _setup()
    mask = (torch.rand(x.shape, dtype=x.dtype) > 0.3).to(x.dtype) / 0.7 if use_mask else None
    y = vera(x @ W.T, x, A, B, d, b, mask)
    ref = _reference_vera(x, W, A, B, d, b, mask)
    _assert_same(y, ref, (x, d, b))


def test_vera_gradcheck():
    A, B, W, x, d, b = _setup()
    base = (x @ W.T).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda base, x, d, b: vera(base, x, A, B, d, b), (base, x, d, b))


def test_vera_saves_only_u():
    """Besides the shared matrices and vectors, the Function keeps tokens x r values."""
    A, B, _, x, d, b = _setup(dtype=torch.float32)
    base = torch.zeros(2, 5, 7)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vera(base, x, A, B, d, b)
    token_sized = [t for t in saved if t.dim() >= 2 and t is not A and t is not B and t.data_ptr() != A.data_ptr()]
    assert [tuple(t.shape) for t in token_sized] == [(2, 5, 6)]


def _reference_dvora(x, W, A, B, m, d, b, bias, detach):
    r, n_out, n_in = d.shape[0], b.shape[0], x.shape[-1]
    V = W + (b[:, None] * B[:n_out, :r] * d[None, :]) @ A[:r, :n_in]
    n = V.norm(dim=1)
    if detach:
        n = n.detach()
    return (x @ V.T) * (m / n) + bias


@pytest.mark.parametrize("detach", [False, True])
def test_dvora_matches_autograd(detach):
    A, B, W, x, d, b = _setup()
    m = (W.norm(dim=1) * 1.3).requires_grad_()
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    frozen = vc.dvora_precompute(W, A, 6)
    y = dvora(x @ W.T, x, frozen, A, B, m, d, b, bias, detach_norm=detach)
    ref = _reference_dvora(x, W, A, B, m, d, b, bias, detach)
    _assert_same(y, ref, (x, m, d, b, bias))


def test_dvora_gradcheck():
    A, B, W, x, d, b = _setup()
    m = W.norm(dim=1).requires_grad_()
    frozen = vc.dvora_precompute(W, A, 6)
    base = (x @ W.T).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda base, x, m, d, b: dvora(base, x, frozen, A, B, m, d, b), (base, x, m, d, b))


PASSES = [(False, False), (False, True), (True, False), (True, True)]


@pytest.mark.parametrize("merged", PASSES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_vera_linear_matches_the_textbook_and_finite_differences(merged, fan_in_fan_out):
    """The whole-layer node, every (forward, backward) choice: against autograd on the formula and gradcheck."""
    A, B, W, x, d, b = _setup()
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    weight = W.T.contiguous() if fan_in_fan_out else W

    def layer(x, d, b, bias):
        return vera_linear(x, weight, bias, A, B, d, b, fan_in_fan_out=fan_in_fan_out, merged=merged)

    y = layer(x, d, b, bias)
    ref = _reference_vera(x, W, A, B, d, b) + bias
    _assert_same(y, ref, (x, d, b, bias))
    assert torch.autograd.gradcheck(layer, (x, d, b, bias))


@pytest.mark.parametrize("merged", PASSES)
def test_vera_linear_saves_only_u(merged):
    """Besides the frozen weight and the vectors, the node keeps tokens x r values: not C, not a merged weight."""
    A, B, W, x, d, b = _setup(dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vera_linear(x, W, None, A, B, d, b, merged=merged)
    others = [t for t in saved if t is not W and t.data_ptr() not in (d.data_ptr(), b.data_ptr())]
    assert [tuple(t.shape) for t in others] == [(2, 5, 6)]


@pytest.mark.parametrize("merged", PASSES)
@pytest.mark.parametrize("detach", [False, True])
def test_dvora_linear_matches_the_textbook_and_finite_differences(merged, detach):
    A, B, W, x, d, b = _setup()
    m = (W.norm(dim=1) * 1.3).requires_grad_()
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    frozen = vc.dvora_precompute(W, A, 6)

    def layer(x, m, d, b, bias):
        return dvora_linear(x, W, bias, frozen, A, B, m, d, b, detach_norm=detach, merged=merged)

    y = layer(x, m, d, b, bias)
    ref = _reference_dvora(x, W, A, B, m, d, b, bias, detach)
    _assert_same(y, ref, (x, m, d, b, bias))
    if not detach:  # a detached norm is not the derivative of the output (DoRA section 4.3)
        assert torch.autograd.gradcheck(layer, (x, m, d, b, bias))


def test_the_whole_layer_nodes_check_their_arguments():
    A, B, W, x, d, b = _setup()
    with pytest.raises(ValueError, match="lambda_b"):
        vera_linear(x, W, None, A, B, d, b[:-1])
    frozen = vc.dvora_precompute(W, A, 6)
    with pytest.raises(ValueError, match="magnitude"):
        dvora_linear(x, W, None, frozen, A, B, W.norm(dim=1)[:-1], d, b)
