"""Property tests: random layer shapes, options, data and dtypes against the float64 oracle, on every backend."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vera_core.testing import ADAPTER_CHECKS, Case
from vera_core.testing._values import supported_floats


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Layers with 0 to 3 leading dimensions, sizes from 1 (rank 1 included), every option."""
    shared_rank, max_in, max_out = (draw(st.integers(1, 5)) for _ in range(3))
    return Case(
        batch=tuple(draw(st.lists(st.integers(1, 3), max_size=3))),
        in_features=draw(st.integers(1, max_in)),
        out_features=draw(st.integers(1, max_out)),
        rank=draw(st.integers(1, shared_rank)),
        shared_rank=shared_rank,
        max_in=max_in,
        max_out=max_out,
        dropout=draw(st.booleans()),
        bias=draw(st.booleans()),
        fan_in_fan_out=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@pytest.mark.parametrize("check", ADAPTER_CHECKS.values(), ids=ADAPTER_CHECKS.keys())
@given(case=cases(), data=st.data())
def test_random_layers_against_float64_oracle(
    xp: Any, device: Any, check: Any, case: Case, data: st.DataObject
) -> None:
    dtype = data.draw(st.sampled_from(supported_floats(xp, device)), label="dtype")
    check(xp, device, case=case, dtype=dtype)
