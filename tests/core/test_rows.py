"""Mixed-adapter batches: one adapter per row equals running each row's adapter alone."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import vera_core as vc

from .host import require_dtype, to_numpy


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_rows_equal_one_adapter_per_row(xp: Any, device: Any, dtype_name: str) -> None:
    dtype = require_dtype(xp, device, dtype_name)
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
