"""VeRA and DVoRA against the float64 oracle, on every backend, case and floating dtype, plus exact properties."""

from __future__ import annotations

import math
from typing import Any

import pytest

import vera_core as vc
from vera_core.testing import ADAPTER_CHECKS, CONFORMANCE_CASES, Case, Layer
from vera_core.testing._values import FLOAT_NAMES, to_nested

from .host import dtypes

CASES = {
    "batched": CONFORMANCE_CASES[0],
    "dropout-bias-transposed": CONFORMANCE_CASES[1],
    "all-sizes-1": CONFORMANCE_CASES[2],
    "full-shared-size": Case(batch=(4,), in_features=6, out_features=5, rank=4, shared_rank=4, seed=3),
    "three-batch-dims": Case(batch=(2, 1, 2), rank=1, dropout=True, seed=4),
    "wide-layer": Case(batch=(1,), in_features=12, out_features=2, rank=2, shared_rank=3, max_in=16, bias=True, seed=5),
}


@pytest.mark.parametrize("dtype", dtypes(*FLOAT_NAMES))
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("check", ADAPTER_CHECKS.values(), ids=ADAPTER_CHECKS.keys())
def test_against_float64_oracle(xp: Any, device: Any, check: Any, case: Case, dtype: str) -> None:
    check(xp, device, case=case, dtype=dtype)


@pytest.mark.needs_dtype("float64")
def test_gram_norm_equals_dense_norm_to_float64_round_off(xp: Any, device: Any) -> None:
    case = Case(batch=(1,), in_features=96, out_features=48, rank=32, shared_rank=40, max_in=100, max_out=50)
    layer = Layer.build(case, xp, device, "float64")
    a = layer.arrays
    gram = vc.dvora_norm(vc.dvora_precompute(a["weight"], a["A"], case.rank), a["B"], a["d"], a["b"])
    dense = vc.dense_norm(a["weight"], a["A"], a["B"], a["d"], a["b"])
    # Both sum in+r products of float64 values: relative round-off below (in + r) eps each.
    rtol = 2 * (case.in_features + case.rank) * float(xp.finfo(xp.float64).eps)
    for g, d in zip(to_nested(gram), to_nested(dense), strict=True):
        assert math.isclose(g, d, rel_tol=rtol)


def test_zero_lambda_b_leaves_the_output_exactly_unchanged(xp: Any, device: Any) -> None:
    layer = Layer.build(Case(dropout=True), xp, device, "float32").with_values(b=[0.0] * 4)
    a = layer.arrays
    base = vc.linear(a["x"], a["weight"])
    y, _ = vc.vera_forward(a["x"], a["A"], a["B"], a["d"], a["b"], base=base, dropout_mask=a["mask"])
    assert to_nested(y) == to_nested(base)


def test_base_is_added_to_the_adapter_term(xp: Any, device: Any) -> None:
    a = Layer.build(Case(), xp, device, "float32").arrays
    base = vc.linear(a["x"], a["weight"])
    alone, u_alone = vc.vera_forward(a["x"], a["A"], a["B"], a["d"], a["b"])
    with_base, u = vc.vera_forward(a["x"], a["A"], a["B"], a["d"], a["b"], base=base)
    assert to_nested(with_base) == to_nested(base + alone)
    assert to_nested(u) == to_nested(u_alone)


@pytest.mark.parametrize("method", ["vera", "dvora"])
def test_merge_leaves_its_inputs_unchanged(xp: Any, device: Any, method: str) -> None:
    a = Layer.build(Case(fan_in_fan_out=True), xp, device, "float32").arrays
    before = {name: to_nested(value) for name, value in a.items()}
    if method == "vera":
        vc.merge(a["weight"], a["A"], a["B"], a["d"], a["b"], fan_in_fan_out=True)
    else:
        vc.dvora_merge(a["weight"], a["A"], a["B"], a["m"], a["d"], a["b"], fan_in_fan_out=True)
    assert {name: to_nested(value) for name, value in a.items()} == before


def test_backward_without_input_grad(xp: Any, device: Any) -> None:
    layer = Layer.build(Case(), xp, device, "float32")
    a = layer.arrays
    _, u = vc.vera_forward(a["x"], a["A"], a["B"], a["d"], a["b"])
    full = vc.vera_backward(a["grad"], u, a["A"], a["B"], a["d"], a["b"], in_features=5)
    vectors = vc.vera_backward(a["grad"], u, a["A"], a["B"], a["d"], a["b"], in_features=5, input_grad=False)
    assert vectors.x is None
    assert to_nested(vectors.lambda_d) == to_nested(full.lambda_d)
    assert to_nested(vectors.lambda_b) == to_nested(full.lambda_b)
