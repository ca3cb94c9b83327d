"""Backward of mixed-adapter batches: the core's row gradients against autodiff and finite differences.

The oracle is one loss written with operators only (a Python loop over the rows, each row
through its own adapter, the DVoRA norm formed from the dense ``W0 + dW``), differentiated
by torch.autograd and jax.grad in float64 where they are installed, and always by central
differences in NumPy float64. The core side composes the forward pieces
(:func:`vera_core.vera_rows_forward`, :func:`vera_core.dvora_norm_rows`,
:func:`vera_core.dvora_rows_output`) and their backward (:func:`vera_core.dvora_rows_backward`,
:func:`vera_core.vera_rows_backward`, :func:`vera_core.segment_sum`), as a bank layer does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import vera_core as vc

from .host import dtypes, to_numpy

IN, OUT, WIDTH, SHARED_R, MAX_IN, MAX_OUT = 7, 5, 4, 6, 8, 6
RANKS = (4, 2, 3, 4)
"""Adapters 0 and 1: DVoRA (1's norm detached, rank 2: zero-padded); 2 and 3: VeRA (3 unused)."""
DVORA, DETACHED = (0, 1), (False, True)
SLOTS = [0, 2, 1, -1, 0, 2]
"""Each batch row's adapter (-1: the bare base layer)."""


def _problem(tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11 + tokens)
    A, B = vc.generate_projections(4, SHARED_R, MAX_IN, MAX_OUT, xp=np, dtype=np.float64)
    D = rng.uniform(0.5, 1.5, (len(RANKS), WIDTH))
    for row, rank in enumerate(RANKS):
        D[row, rank:] = 0.0
    W = 0.4 * rng.standard_normal((OUT, IN))
    M = np.sqrt((W * W).sum(axis=1)) * rng.uniform(0.8, 1.2, (len(RANKS), OUT))
    batch = (len(SLOTS), tokens) if tokens else (len(SLOTS),)
    return {
        "A": A,
        "B": B,
        "W": W,
        "bias": rng.standard_normal(OUT),
        "D": D,
        "Bv": rng.standard_normal((len(RANKS), OUT)),
        "M": M,
        "x": rng.standard_normal((*batch, IN)),
        "G": rng.standard_normal((*batch, OUT)),
    }


def _delta(v: dict[str, Any], slot: int) -> Any:
    """Adapter ``slot``'s ``dW = diag(b) B_s diag(d) A_s`` (out x in), in operators only."""
    r = RANKS[slot]
    d, b = v["D"][slot][:r], v["Bv"][slot]
    return (b[:, None] * v["B"][:OUT, :r] * d[None, :]) @ v["A"][:r, :IN]


def plain_loss(v: dict[str, Any], stop: Callable[[Any, int], Any]) -> Any:
    """``sum(G * y)``, each row through its own adapter, in operators only (NumPy, torch, JAX alike).

    ``stop(norm, slot)`` gives the norm a detached DVoRA adapter uses: the norm with its
    gradient stopped, or held at a value (finite differences).
    """
    total = 0.0
    for i, slot in enumerate(SLOTS):
        x = v["x"][i]
        z = x @ v["W"].T
        if slot >= 0:
            delta = _delta(v, slot)
            z = z + x @ delta.T
            if slot in DVORA:
                norm = (((v["W"] + delta) ** 2).sum(axis=1)) ** 0.5
                if DETACHED[DVORA.index(slot)]:
                    norm = stop(norm, slot)
                z = v["M"][slot] / norm * z
        total = total + (v["G"][i] * (z + v["bias"])).sum()
    return total


NAMES = ("D", "Bv", "M", "x")


def torch_oracle(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    tensors = {k: torch.tensor(a, dtype=torch.float64, requires_grad=k in NAMES) for k, a in values.items()}
    plain_loss(tensors, lambda t, slot: t.detach()).backward()
    return {name: tensors[name].grad.numpy() for name in NAMES}


def jax_oracle(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import jax

    jax.config.update("jax_enable_x64", True)
    arrays = {k: jax.numpy.asarray(a, dtype=jax.numpy.float64) for k, a in values.items()}

    def stop(t: Any, slot: int) -> Any:
        return jax.lax.stop_gradient(t)

    grads = jax.grad(lambda t: plain_loss({**arrays, **t}, stop))({n: arrays[n] for n in NAMES})
    return {name: np.asarray(grads[name]) for name in NAMES}


def central_differences(values: dict[str, np.ndarray], loss: Any, step: float = 1e-6) -> dict[str, np.ndarray]:
    """``d loss / d values[name]`` for each of NAMES, by central differences in float64."""
    grads = {}
    for name in NAMES:
        grad = np.zeros_like(values[name])
        for index in np.ndindex(grad.shape):
            shifted = []
            for sign in (1.0, -1.0):
                moved = dict(values)
                moved[name] = values[name].copy()
                moved[name][index] += sign * step
                shifted.append(loss(moved))
            grad[index] = (shifted[0] - shifted[1]) / (2 * step)
        grads[name] = grad
    return grads


def finite_differences(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return central_differences(values, lambda v: plain_loss(v, lambda t, slot: t))


def finite_differences_detached(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Central differences with the detached adapter's norm held at its value (a constant, as DoRA 4.3 treats it)."""
    held = {
        slot: np.sqrt(((values["W"] + _delta(values, slot)) ** 2).sum(axis=1))
        for slot, detached in zip(DVORA, DETACHED, strict=True)
        if detached
    }
    return central_differences(values, lambda v: plain_loss(v, lambda norm, slot: held[slot]))


ORACLES = {"torch.autograd": torch_oracle, "jax.grad": jax_oracle, "finite-differences": finite_differences_detached}
_EXPECTED: dict[tuple[str, int], dict[str, np.ndarray]] = {}
"""Oracle gradients per (oracle, tokens): the same for every backend and dtype, computed once."""


def core_grads(xp: Any, device: Any, dtype: Any, values: dict[str, np.ndarray]) -> tuple[Any, dict[str, np.ndarray]]:
    """The bank layer's forward and backward from the core's row functions; host gradients per table."""
    v = {k: xp.asarray(a, dtype=dtype, device=device) for k, a in values.items()}
    slots = xp.asarray(SLOTS, dtype=xp.int64, device=device)
    count = len(RANKS)
    d_rows, b_rows = vc.take_rows(v["D"], slots), vc.take_rows(v["Bv"], slots)
    z, u = vc.vera_rows_forward(v["x"], v["A"], v["B"], d_rows, b_rows, base=vc.linear(v["x"], v["W"]))
    dv = xp.asarray(DVORA, dtype=xp.int64, device=device)
    row_to_dv = xp.asarray([DVORA.index(s) if s in DVORA else -1 for s in SLOTS], dtype=xp.int64, device=device)
    frozen = vc.dvora_precompute(v["W"], v["A"], WIDTH)
    d_dv, b_dv, m_dv = (xp.take(v[k], dv, axis=0) for k in ("D", "Bv", "M"))
    norm = vc.dvora_norm_rows(frozen, v["B"], d_dv, b_dv)
    y = vc.dvora_rows_output(
        z, vc.take_rows(m_dv, row_to_dv, fill=1.0), vc.take_rows(norm, row_to_dv, fill=1.0), bias=v["bias"]
    )
    detach = xp.asarray(DETACHED, device=device)
    scaled = vc.dvora_rows_backward(v["G"], z, frozen, v["B"], m_dv, d_dv, b_dv, norm, row_to_dv, detach_norm=detach)
    rows = vc.vera_rows_backward(scaled.z, u, v["A"], v["B"], d_rows, b_rows, in_features=IN)
    mask = xp.asarray(np.arange(WIDTH)[None, :] < np.asarray(RANKS)[:, None], dtype=dtype, device=device)
    grads = {
        "D": (vc.segment_sum(rows.lambda_d, slots, count) + vc.segment_sum(scaled.lambda_d, dv, count)) * mask,
        "Bv": vc.segment_sum(rows.lambda_b, slots, count) + vc.segment_sum(scaled.lambda_b, dv, count),
        "M": vc.segment_sum(scaled.magnitude, dv, count),
        "x": rows.x + vc.linear_input_grad(scaled.z, v["W"]),
    }
    return y, {k: to_numpy(g) for k, g in grads.items()}


@pytest.mark.parametrize("tokens", [0, 3, 6], ids=["no-tokens", "tokens<rank", "tokens>rank"])
@pytest.mark.parametrize("dtype_name", dtypes("float32", "float64"))
@pytest.mark.parametrize(
    "oracle",
    [
        pytest.param("torch.autograd", marks=pytest.mark.requires("torch")),
        pytest.param("jax.grad", marks=pytest.mark.requires("jax")),
        "finite-differences",
    ],
)
def test_rows_backward_matches_autodiff(xp: Any, device: Any, oracle: str, dtype_name: str, tokens: int) -> None:
    dtype = getattr(xp, dtype_name)
    values = _problem(tokens)
    if (oracle, tokens) not in _EXPECTED:
        _EXPECTED[oracle, tokens] = ORACLES[oracle](values)
    expected = _EXPECTED[oracle, tokens]
    _, got = core_grads(xp, device, dtype, values)
    tolerance = 1e-4 if dtype_name == "float32" else (1e-6 if oracle == "finite-differences" else 1e-10)
    for name in NAMES:
        scale = max(1.0, float(np.abs(expected[name]).max()))
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=tolerance * scale, err_msg=name)
    assert np.all(got["M"][2:] == 0) and np.all(got["D"][1, RANKS[1] :] == 0)  # VeRA rows, padding: no gradient
    assert np.all(got["D"][3] == 0) and np.all(got["Bv"][3] == 0)  # adapter 3 is absent from the batch


@pytest.mark.needs_dtype("float64")
def test_forward_matches_the_plain_loss(xp: Any, device: Any) -> None:
    """The composed forward is the oracle's (so the gradients above are of the same function)."""
    dtype = xp.float64
    values = _problem(3)
    y, _ = core_grads(xp, device, dtype, values)
    expected = plain_loss(values, lambda t, slot: t)
    got = float(np.sum(values["G"] * to_numpy(y)))
    assert abs(got - expected) <= 1e-10 * max(1.0, abs(expected))


def test_finite_differences_see_the_exact_norm() -> None:
    """The exact oracle's finite differences differ from the detached ones for the detached adapter only."""
    values = _problem(0)
    exact, held = finite_differences(values), finite_differences_detached(values)
    assert not np.allclose(exact["D"][1], held["D"][1], atol=1e-6)
    np.testing.assert_allclose(exact["D"][0], held["D"][0], atol=1e-7)


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("dtype_name", dtypes("float32", "float64"))
def test_rows_backward_equals_one_adapter_per_row(xp: Any, device: Any, dtype_name: str, tokens: int) -> None:
    """Each row's gradients are vera_backward's for that row alone (dropout mask included)."""
    dtype = getattr(xp, dtype_name)
    rng = np.random.default_rng(2)
    batch, rank = 4, 4
    A, B = vc.generate_projections(9, 6, 8, 6, xp=xp, dtype=dtype, device=device)

    def array(host: Any) -> Any:
        return xp.asarray(host, dtype=dtype, device=device)

    x, g = array(rng.standard_normal((batch, tokens, IN))), array(rng.standard_normal((batch, tokens, OUT)))
    mask = array(rng.integers(0, 2, (batch, tokens, IN)) * 2.0)
    d, b = array(rng.standard_normal((batch, rank))), array(rng.standard_normal((batch, OUT)))
    _, u = vc.vera_rows_forward(x, A, B, d, b, dropout_mask=mask)
    rows = vc.vera_rows_backward(g, u, A, B, d, b, in_features=IN, dropout_mask=mask)
    eps = float(np.finfo(dtype_name).eps)
    for i in range(batch):
        _, u_i = vc.vera_forward(x[i, ...], A, B, d[i, ...], b[i, ...], dropout_mask=mask[i, ...])
        alone = vc.vera_backward(g[i, ...], u_i, A, B, d[i, ...], b[i, ...], in_features=IN, dropout_mask=mask[i, ...])
        for name, got, want in (("x", rows.x[i, ...], alone.x), ("d", rows.lambda_d[i, ...], alone.lambda_d)):
            got_host, want_host = to_numpy(got), to_numpy(want)
            bound = 200 * eps * max(1.0, float(np.abs(want_host).max()))
            np.testing.assert_allclose(got_host, want_host, rtol=0, atol=bound, err_msg=f"row {i} {name}")
        got_b, want_b = to_numpy(rows.lambda_b[i, ...]), to_numpy(alone.lambda_b)
        np.testing.assert_allclose(got_b, want_b, rtol=0, atol=200 * eps * max(1.0, float(np.abs(want_b).max())))
    no_x = vc.vera_rows_backward(g, u, A, B, d, b, in_features=IN, input_grad=False)
    assert no_x.x is None


def test_row_functions_check_their_arguments(xp: Any, device: Any) -> None:
    A, B = vc.generate_projections(0, 4, 8, 6, xp=xp, device=device)
    g, u = xp.ones((3, 6), device=device), xp.ones((3, 4), device=device)
    d, b = xp.ones((3, 4), device=device), xp.ones((3, 6), device=device)
    with pytest.raises(ValueError, match="lambda_b_rows has 2 rows but grad_y has a batch of 3"):
        vc.vera_rows_backward(g, u, A, B, d, xp.ones((2, 6), device=device), in_features=8)
    with pytest.raises(ValueError, match="u must have the shape of grad_y with rank last"):
        vc.vera_rows_backward(g, xp.ones((3, 3), device=device), A, B, d, b, in_features=8)
    with pytest.raises(ValueError, match=r"grad_y must have shape \(batch, \.\.\., out\)"):
        vc.vera_rows_backward(xp.ones(6, device=device), u, A, B, d, b, in_features=8)
    frozen = vc.dvora_precompute(xp.ones((6, 8), device=device), A, 4)
    m, n = xp.ones((1, 6), device=device), xp.ones((1, 6), device=device)
    rows = xp.asarray([0, -1, 0], device=device)
    z = xp.ones((3, 6), device=device)
    with pytest.raises(ValueError, match=r"rows must have the shape of \(batch,\) of z"):
        vc.dvora_rows_backward(z, z, frozen, B, m, d[:1, ...], b[:1, ...], n, rows[:2])
    with pytest.raises(TypeError, match="rows must have an integer dtype"):
        vc.dvora_rows_backward(z, z, frozen, B, m, d[:1, ...], b[:1, ...], n, xp.ones(3, device=device))
    with pytest.raises(ValueError, match="detach_norm must have the shape"):
        vc.dvora_rows_backward(z, z, frozen, B, m, d[:1, ...], b[:1, ...], n, rows, detach_norm=xp.ones(2) > 0)
    with pytest.raises(ValueError, match="lambda_d has 3 rows and magnitude 1"):
        vc.dvora_rows_backward(z, z, frozen, B, m, d, b[:1, ...], n, rows)


@pytest.mark.needs_dtype("float64")
@pytest.mark.parametrize("order", ["sorted", "unsorted", "equal-segments"])
def test_segment_sum_and_take_rows(xp: Any, device: Any, order: str) -> None:
    """Against a loop on the host, with rows left out (-1), empty segments, and a trailing axis."""
    rng = np.random.default_rng(0)
    ids_host = rng.integers(-1, 5, 40)
    if order == "sorted":
        ids_host.sort()
    elif order == "equal-segments":
        ids_host = np.repeat(np.asarray([-1, 0, 2, 3, 4]), 8)  # 8 rows each: NumPy's reshaped sum
    values_host = rng.integers(-8, 8, (40, 3, 2)).astype(np.float64)  # integers: every order sums exactly
    expected = np.zeros((7, 3, 2))
    for i, s in enumerate(ids_host):
        if s >= 0:
            expected[s] += values_host[i]
    dtype = xp.float64
    got = vc.segment_sum(xp.asarray(values_host, dtype=dtype, device=device), xp.asarray(ids_host, device=device), 7)
    np.testing.assert_array_equal(to_numpy(got), expected)
    table = xp.asarray(values_host[:5, :, 0], dtype=dtype, device=device)
    taken = to_numpy(vc.take_rows(table, xp.asarray(ids_host, device=device), fill=-3.0))
    want = np.where((ids_host >= 0)[:, None], values_host[:5, :, 0][np.maximum(ids_host, 0)], -3.0)
    np.testing.assert_array_equal(taken, want)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(40,\)"):
        vc.segment_sum(xp.asarray(values_host, device=device), xp.asarray(ids_host[:3], device=device), 7)
