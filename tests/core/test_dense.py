"""The dense (merged-weight) VeRA formulation agrees with the factored one on every backend."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import vera_core as vc

from .host import dtypes, to_numpy

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
@pytest.mark.parametrize("dtype_name", dtypes("float32", "float64"))
def test_dense_equals_factored(xp: Any, device: Any, dtype_name: str, fan_in_fan_out: bool) -> None:
    dtype = getattr(xp, dtype_name)
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


def _rms(array: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(array.astype(np.float64)))))


HALF_SHAPE = {"tokens": 64, "in": 48, "out": 40, "rank": 16}


def _half_problem(xp: Any, device: Any, half: Any, fan_in_fan_out: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """16-bit activations and weight with float32 vectors, and the same values in float64."""
    rng = np.random.default_rng(3)
    s = HALF_SHAPE
    host = {
        "x": rng.standard_normal((s["tokens"], s["in"])),
        "weight": 0.2 * rng.standard_normal((s["in"], s["out"]) if fan_in_fan_out else (s["out"], s["in"])),
        "bias": rng.standard_normal(s["out"]),
        "grad_y": rng.standard_normal((s["tokens"], s["out"])),
    }
    vectors = {"lambda_d": 0.1 + 0.05 * rng.standard_normal(s["rank"]), "lambda_b": 0.5 * rng.standard_normal(s["out"])}
    low = {k: xp.asarray(v, dtype=half, device=device) for k, v in host.items()}
    low |= {k: xp.asarray(v, dtype=xp.float32, device=device) for k, v in vectors.items()}
    low["A"], low["B"] = vc.generate_projections(9, s["rank"], s["in"], s["out"], xp=xp, device=device)
    wide = {k: xp.astype(v, xp.float64) for k, v in low.items()}
    return low, wide


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("half_name", dtypes("float16", "bfloat16"))
@pytest.mark.needs_dtype("float64")
def test_dense_16_bit_is_as_accurate_as_factored(xp: Any, device: Any, half_name: str, fan_in_fan_out: bool) -> None:
    """16-bit merged weight: errors against float64 (same inputs) no larger than the factored form's."""
    half = getattr(xp, half_name)
    low, wide = _half_problem(xp, device, half, fan_in_fan_out)
    flip = {"fan_in_fan_out": fan_in_fan_out}

    def host(array: Any) -> np.ndarray:
        return to_numpy(xp.astype(array, xp.float64))

    def run(p: dict[str, Any], dense: bool) -> list[np.ndarray]:
        vectors = (p["A"], p["B"], p["lambda_d"], p["lambda_b"])
        if dense:
            y, u = vc.vera_forward_dense(p["x"], p["weight"], *vectors, bias=p["bias"], **flip)
            grads = vc.vera_backward_dense(p["grad_y"], u, p["weight"], *vectors, **flip)
            return [host(a) for a in (y, grads.x, grads.lambda_d, grads.lambda_b)]
        y, u = vc.vera_forward(p["x"], *vectors, base=vc.linear(p["x"], p["weight"], p["bias"], **flip))
        grads = vc.vera_backward(p["grad_y"], u, *vectors, in_features=HALF_SHAPE["in"])
        grad_x = host(grads.x) + host(vc.linear_input_grad(p["grad_y"], p["weight"], **flip))
        return [host(y), grad_x, host(grads.lambda_d), host(grads.lambda_b)]

    exact = run(wide, dense=False)
    eps = float(np.finfo(np.float16).eps) if half_name == "float16" else 2.0**-7
    names = ("y", "x", "lambda_d", "lambda_b")
    for name, got, baseline, want in zip(names, run(low, True), run(low, False), exact, strict=True):
        error, baseline_error = _rms(got - want), _rms(baseline - want)
        assert error <= 1.5 * baseline_error + 1e-6 * _rms(want), (name, error, baseline_error)
        assert error <= 2 * eps * _rms(want), (name, error, _rms(want))


@pytest.mark.parametrize(
    ("tokens", "in_features", "out_features", "rank", "expected"),
    [
        (2048, 1024, 1024, 256, (True, True)),
        (8192, 4096, 4096, 256, (True, True)),
        (1, 4096, 4096, 256, (False, False)),
        (16, 1024, 1024, 256, (False, False)),
        (64, 32, 32, 8, (False, False)),  # merging would save 8,192 and 24,576 multiply-adds: too few
        (0, 8, 8, 2, (False, False)),
        # saved by merging, at in = out = 1024, r = 256: forward 2**18 (T - 1024), backward 2**18 (2 T - 1024);
        # each pass merges from 2**20 (DENSE_MIN_SAVING): backward from T = 514, forward from T = 1028
        (513, 1024, 1024, 256, (False, False)),
        (514, 1024, 1024, 256, (False, True)),
        (1027, 1024, 1024, 256, (False, True)),
        (1028, 1024, 1024, 256, (True, True)),
    ],
)
def test_merged_passes_counts_multiply_adds(
    tokens: int, in_features: int, out_features: int, rank: int, expected: tuple[bool, bool]
) -> None:
    assert vc.merged_passes(tokens, in_features, out_features, rank) == expected


@pytest.mark.parametrize("passes", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype_name", dtypes("float64"))
def test_every_pass_choice_gives_the_same_layer(
    xp: Any, device: Any, dtype_name: str, fan_in_fan_out: bool, passes: Any
) -> None:
    """Each (forward, backward) choice equals the fully merged one in float64 (and so the factored reference)."""
    p = _problem(xp, device, getattr(xp, dtype_name), fan_in_fan_out)
    flip = {"fan_in_fan_out": fan_in_fan_out}
    vectors = (p["A"], p["B"], p["lambda_d"], p["lambda_b"])
    y_ref, u = vc.vera_forward_dense(p["x"], p["weight"], *vectors, bias=p["bias"], **flip)
    ref = vc.vera_backward_dense(p["grad_y"], u, p["weight"], *vectors, **flip)
    y, u = vc.vera_forward_dense(p["x"], p["weight"], *vectors, bias=p["bias"], merged=passes[0], **flip)
    got = vc.vera_backward_dense(p["grad_y"], u, p["weight"], *vectors, merged=passes[1], **flip)
    for a, b in ((y, y_ref), (got.x, ref.x), (got.lambda_d, ref.lambda_d), (got.lambda_b, ref.lambda_b)):
        assert float(xp.max(xp.abs(a - b))) <= 1e-12 * (1 + float(xp.max(xp.abs(b))))


@pytest.mark.parametrize("detach_norm", [False, True])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype_name", dtypes("float32", "float64"))
def test_dvora_dense_equals_factored(
    xp: Any, device: Any, dtype_name: str, fan_in_fan_out: bool, detach_norm: bool
) -> None:
    dtype = getattr(xp, dtype_name)
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


def _same(got: Any, want: Any) -> None:
    if want is None:
        assert got is None
    else:
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_backward_without_checks_gives_the_same_gradients(xp: Any, device: Any, fan_in_fan_out: bool) -> None:
    """``check=False`` (what the torch Functions pass) skips validation only: every gradient is identical."""
    p = _problem(xp, device, xp.float32, fan_in_fan_out)
    vectors = (p["A"], p["B"], p["lambda_d"], p["lambda_b"])
    flip = {"fan_in_fan_out": fan_in_fan_out}
    _, u = vc.vera_forward_dense(p["x"], p["weight"], *vectors, bias=p["bias"], **flip)
    frozen = vc.dvora_precompute(p["weight"], p["A"], SHAPE["rank"], **flip)
    magnitude = vc.initial_magnitude(p["weight"], dtype=xp.float32, **flip) * 1.5
    dvora_args = (p["A"], p["B"], magnitude, p["lambda_d"], p["lambda_b"])
    _, saved = vc.dvora_forward_dense(p["x"], p["weight"], frozen, *dvora_args, **flip)
    runs = [
        lambda check: vc.vera_backward(p["grad_y"], u, *vectors, in_features=SHAPE["in"], check=check),
        lambda check: vc.vera_backward_dense(p["grad_y"], u, p["weight"], *vectors, check=check, **flip),
        lambda check: vc.dvora_backward(
            p["grad_y"], saved, frozen, *dvora_args, in_features=SHAPE["in"], has_bias=True, check=check
        ),
        lambda check: vc.dvora_backward_dense(
            p["grad_y"], saved, frozen, p["weight"], *dvora_args, has_bias=True, check=check, **flip
        ),
    ]
    for run in runs:
        for got, want in zip(run(False), run(True), strict=True):
            _same(got, want)


@pytest.mark.needs_dtype("float16")
def test_b_may_be_kept_in_the_vectors_dtype(xp: Any, device: Any) -> None:
    """B beside 16-bit activations and A: in the vectors' float32, exactly as the same values in 16 bits."""
    half = xp.float16
    low, _ = _half_problem(xp, device, half, False)
    A, B = xp.astype(low["A"], half), xp.astype(low["B"], half)
    B_wide = xp.astype(B, xp.float32)  # exact: every float16 is a float32
    vectors = (low["lambda_d"], low["lambda_b"])
    base = vc.linear(low["x"], low["weight"])
    y, u = vc.vera_forward(low["x"], A, B, *vectors, base=base)
    y_wide, u_wide = vc.vera_forward(low["x"], A, B_wide, *vectors, base=base)
    _same(y_wide, y)
    grads = vc.vera_backward(low["grad_y"], u, A, B, *vectors, in_features=HALF_SHAPE["in"])
    grads_wide = vc.vera_backward(low["grad_y"], u_wide, A, B_wide, *vectors, in_features=HALF_SHAPE["in"])
    for got, want in zip(grads_wide, grads, strict=True):
        _same(got, want)
