"""Mixed-adapter batches: one adapter per row equals running each row's adapter alone."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import vera_core as vc

from .host import dtypes, to_numpy


@pytest.mark.parametrize("dtype_name", dtypes("float32", "float64"))
def test_rows_equal_one_adapter_per_row(xp: Any, device: Any, dtype_name: str) -> None:
    dtype = getattr(xp, dtype_name)
    rng = np.random.default_rng(3)
    batch, tokens, n_in, n_out, rank = 4, 3, 7, 5, 4
    A, B = vc.generate_projections(9, 6, 8, 6, xp=xp, dtype=dtype, device=device)
    x = xp.asarray(rng.standard_normal((batch, tokens, n_in)), dtype=dtype, device=device)
    d_host = rng.standard_normal((batch, rank))
    d_host[2, 2:] = 0.0  # row 2: an adapter of rank 2, zero-padded
    b_host = rng.standard_normal((batch, n_out))
    b_host[1] = 0.0  # row 1: no adapter
    d, b = (xp.asarray(v, dtype=dtype, device=device) for v in (d_host, b_host))
    rows = to_numpy(vc.vera_delta_rows(x, A, B, d, b))
    eps = float(np.finfo(dtype_name).eps)
    for i in range(batch):
        rank_i = 2 if i == 2 else rank
        alone, _ = vc.vera_forward(x[i, ...], A, B, d[i, :rank_i], b[i, ...])
        np.testing.assert_allclose(rows[i], to_numpy(alone), rtol=0, atol=100 * eps * max(1.0, np.abs(rows).max()))
    assert np.all(rows[1] == 0)


def test_rows_check_their_shapes(xp: Any, device: Any) -> None:
    A, B = vc.generate_projections(0, 4, 8, 6, xp=xp, device=device)
    x = xp.ones((3, 8), device=device)
    with pytest.raises(ValueError, match="lambda_b_rows has 2 rows but x has a batch of 3"):
        vc.vera_delta_rows(x, A, B, xp.ones((3, 4), device=device), xp.ones((2, 6), device=device))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, \.\.\., in\)"):
        vc.vera_delta_rows(
            xp.ones(8, device=device), A, B, xp.ones((1, 4), device=device), xp.ones((1, 6), device=device)
        )


@pytest.mark.parametrize("dtype_name", dtypes("float32", "float64"))
def test_dvora_rows_equal_one_adapter_per_row(xp: Any, device: Any, dtype_name: str) -> None:
    """Rows of two DVoRA adapters (ranks 4 and 2), none and a VeRA adapter: each as if run alone."""
    dtype = getattr(xp, dtype_name)
    rng = np.random.default_rng(5)
    batch, tokens, n_in, n_out = 4, 3, 7, 5
    A, B = vc.generate_projections(9, 6, 8, 6, xp=xp, dtype=dtype, device=device)

    def array(host: Any) -> Any:
        return xp.asarray(host, dtype=dtype, device=device)

    x = array(rng.standard_normal((batch, tokens, n_in)))
    W, bias = array(0.3 * rng.standard_normal((n_out, n_in))), array(rng.standard_normal(n_out))
    d = [array(rng.standard_normal(r)) for r in (4, 4, 2, 4)]
    b = [array(rng.standard_normal(n_out)) for _ in range(batch)]
    m = [vc.initial_magnitude(W, dtype=dtype) * array(1.0 + 0.2 * rng.standard_normal(n_out)) for _ in range(batch)]
    frozen = {i: vc.dvora_precompute(W, A, d[i].shape[0]) for i in (0, 2)}  # rows 0 and 2: DVoRA
    norms = {i: vc.dvora_norm(frozen[i], B, d[i], b[i]) for i in frozen}
    zero_d, ones = xp.zeros(4, dtype=dtype, device=device), xp.ones(n_out, dtype=dtype, device=device)
    d_rows = xp.stack([d[0], zero_d, xp.concat([d[2], xp.zeros(2, dtype=dtype, device=device)]), d[3]])
    b_rows = xp.stack([b[0], xp.zeros(n_out, dtype=dtype, device=device), b[2], b[3]])
    m_rows = xp.stack([m[0], ones, m[2], ones])
    n_rows = xp.stack([norms[0], ones, norms[2], ones])
    z = vc.linear(x, W) + vc.vera_delta_rows(x, A, B, d_rows, b_rows)
    rows = to_numpy(vc.dvora_rows_output(z, m_rows, n_rows, bias=bias))

    def alone(i: int) -> Any:
        xi = x[i, ...]
        if i in frozen:
            return vc.dvora_forward(xi, vc.linear(xi, W), frozen[i], A, B, m[i], d[i], b[i], bias=bias)[0]
        if i == 1:
            return vc.linear(xi, W, bias)
        return vc.vera_forward(xi, A, B, d[i], b[i], base=vc.linear(xi, W, bias))[0]

    eps = float(np.finfo(dtype_name).eps)
    for i in range(batch):
        np.testing.assert_allclose(rows[i], to_numpy(alone(i)), rtol=0, atol=100 * eps * max(1.0, np.abs(rows).max()))


def test_dvora_rows_check_their_arguments(xp: Any, device: Any) -> None:
    z, ones = xp.ones((3, 2, 4), device=device), xp.ones((3, 4), device=device)
    with pytest.raises(ValueError, match=r"norm_rows must have the shape of \(batch, out_features\) of z"):
        vc.dvora_rows_output(z, ones, xp.ones((2, 4), device=device))
    with pytest.raises(ValueError, match="bias must have the shape"):
        vc.dvora_rows_output(z, ones, ones, bias=xp.ones(5, device=device))
    with pytest.raises(ValueError, match=r"z must have shape \(batch, \.\.\., out\)"):
        vc.dvora_rows_output(xp.ones(4, device=device), ones, ones)
