"""The dense (merged-weight) VeRA formulation agrees with the factored one on every backend."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import vera_core as vc

from .host import require_dtype, to_numpy

SHAPE = {"tokens": 7, "in": 9, "out": 5, "rank": 3, "shared_rank": 4, "max_in": 11, "max_out": 6}


def _problem(xp: Any, device: Any, dtype: Any, fan_in_fan_out: bool) -> dict[str, Any]:
    rng = np.random.default_rng(11)
    s = SHAPE
    host = {
        "x": rng.standard_normal((2, s["tokens"], s["in"])),
        "weight": rng.standard_normal((s["in"], s["out"]) if fan_in_fan_out else (s["out"], s["in"])),
        "bias": rng.standard_normal(s["out"]),
        "lambda_d": rng.standard_normal(s["rank"]),
        "lambda_b": rng.standard_normal(s["out"]),
        "grad_y": rng.standard_normal((2, s["tokens"], s["out"])),
    }
    arrays = {k: xp.asarray(v, dtype=dtype, device=device) for k, v in host.items()}
    arrays["A"], arrays["B"] = vc.generate_projections(
        5, s["shared_rank"], s["max_in"], s["max_out"], xp=xp, dtype=dtype, device=device
    )
    return arrays


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_dense_equals_factored(xp: Any, device: Any, dtype_name: str, fan_in_fan_out: bool) -> None:
    dtype = require_dtype(xp, device, dtype_name)
    p = _problem(xp, device, dtype, fan_in_fan_out)
    vectors = (p["A"], p["B"], p["lambda_d"], p["lambda_b"])
    y, u = vc.vera_forward_dense(p["x"], p["weight"], *vectors, bias=p["bias"], fan_in_fan_out=fan_in_fan_out)
    base = vc.linear(p["x"], p["weight"], p["bias"], fan_in_fan_out=fan_in_fan_out)
    y_ref, u_ref = vc.vera_forward(p["x"], *vectors, base=base)
    dense = vc.vera_backward_dense(p["grad_y"], u, p["weight"], *vectors, fan_in_fan_out=fan_in_fan_out)
    factored = vc.vera_backward(p["grad_y"], u_ref, *vectors, in_features=SHAPE["in"])
    grad_x_ref = to_numpy(factored.x) + to_numpy(
        vc.linear_input_grad(p["grad_y"], p["weight"], fan_in_fan_out=fan_in_fan_out)
    )
    eps = float(np.finfo(dtype_name).eps)
    pairs = [
        (y, y_ref),
        (u, u_ref),
        (dense.lambda_d, factored.lambda_d),
        (dense.lambda_b, factored.lambda_b),
    ]
    for got, want in [*((to_numpy(a), to_numpy(b)) for a, b in pairs), (to_numpy(dense.x), grad_x_ref)]:
        scale = max(1.0, float(np.max(np.abs(want))))
        np.testing.assert_allclose(got, want, rtol=0, atol=200 * eps * scale)


def test_dense_refuses_16_bit_activations(xp: Any, device: Any) -> None:
    half = require_dtype(xp, device, "float16")
    p = _problem(xp, device, xp.float32, False)
    with pytest.raises(TypeError, match="swamp"):
        vc.vera_forward_dense(
            xp.astype(p["x"], half), xp.astype(p["weight"], half), p["A"], p["B"], p["lambda_d"], p["lambda_b"]
        )


@pytest.mark.parametrize(
    ("tokens", "in_features", "out_features", "rank", "backward", "expected"),
    [
        (2048, 1024, 1024, 256, True, True),
        (8192, 4096, 4096, 256, True, True),
        (1, 4096, 4096, 256, False, False),
        (16, 1024, 1024, 256, True, False),
    ],
)
def test_dense_is_cheaper_counts_multiply_adds(
    tokens: int, in_features: int, out_features: int, rank: int, backward: bool, expected: bool
) -> None:
    assert vc.dense_is_cheaper(tokens, in_features, out_features, rank, backward=backward) is expected


@pytest.mark.parametrize("detach_norm", [False, True])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_dvora_dense_equals_factored(
    xp: Any, device: Any, dtype_name: str, fan_in_fan_out: bool, detach_norm: bool
) -> None:
    dtype = require_dtype(xp, device, dtype_name)
    p = _problem(xp, device, dtype, fan_in_fan_out)
    rank = SHAPE["rank"]
    frozen = vc.dvora_precompute(p["weight"], p["A"], rank, fan_in_fan_out=fan_in_fan_out)
    magnitude = vc.initial_magnitude(p["weight"], fan_in_fan_out=fan_in_fan_out, dtype=dtype) * 1.5
    args = (p["A"], p["B"], magnitude, p["lambda_d"], p["lambda_b"])
    y, saved = vc.dvora_forward_dense(p["x"], p["weight"], frozen, *args, bias=p["bias"], fan_in_fan_out=fan_in_fan_out)
    base = vc.linear(p["x"], p["weight"], fan_in_fan_out=fan_in_fan_out)
    y_ref, saved_ref = vc.dvora_forward(p["x"], base, frozen, *args, bias=p["bias"])
    options = {"detach_norm": detach_norm, "has_bias": True}
    dense = vc.dvora_backward_dense(
        p["grad_y"], saved, frozen, p["weight"], *args, fan_in_fan_out=fan_in_fan_out, **options
    )
    factored = vc.dvora_backward(p["grad_y"], saved_ref, frozen, *args, in_features=SHAPE["in"], **options)
    whole_x = to_numpy(factored.x) + to_numpy(
        vc.linear_input_grad(factored.base, p["weight"], fan_in_fan_out=fan_in_fan_out)
    )
    assert dense.base is None
    eps = float(np.finfo(dtype_name).eps)
    pairs = [(to_numpy(y), to_numpy(y_ref)), (to_numpy(dense.x), whole_x)]
    pairs += [
        (to_numpy(getattr(dense, f)), to_numpy(getattr(factored, f)))
        for f in ("magnitude", "lambda_d", "lambda_b", "bias")
    ]
    for got, want in pairs:
        np.testing.assert_allclose(got, want, rtol=0, atol=500 * eps * max(1.0, float(np.max(np.abs(want)))))
