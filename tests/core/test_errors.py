"""Every documented misuse raises its exception with a message that says what is wrong, on every backend."""

from __future__ import annotations

import math
from typing import Any

import pytest

import vera_core as vc
from vera_core.testing import ERROR_CASES, Case, ErrorCase, Layer, LoadedBackend, check_error_case
from vera_core.testing._values import to_nested
from vera_core.testing.error_checks import Inputs

NEEDS = {"float64": pytest.mark.needs_dtype("float64"), "two devices": pytest.mark.needs_second_device}


@pytest.mark.parametrize(
    "case", [pytest.param(case, id=case.name, marks=[NEEDS[case.needs]] if case.needs else []) for case in ERROR_CASES]
)
def test_error(backend: LoadedBackend, case: ErrorCase) -> None:
    check_error_case(case, backend.xp, backend.device, backend.other_device)


def test_merge_without_safe_passes_infinity_through(xp: Any, device: Any) -> None:
    inputs = Inputs(Layer.build(Case(), xp, device))
    a = inputs.layer.arrays
    merged = vc.merge(inputs.weight_with(math.inf), a["A"], a["B"], a["d"], a["b"])
    assert to_nested(merged)[0][0] == math.inf


@pytest.mark.requires("array_api_strict")
def test_arrays_of_two_libraries_are_refused_every_time() -> None:
    """The namespace is remembered per combination of array types; a mix is never remembered."""
    import array_api_strict as strict
    import numpy as np

    A, B = vc.generate_projections(0, 4, 8, 6, xp=np)
    d, b = np.full(4, 0.1, dtype=np.float32), np.zeros(6, dtype=np.float32)
    x = np.ones((2, 8), dtype=np.float32)
    vc.vera_forward(x, A, B, d, b)  # the NumPy combination is remembered
    for _ in range(2):
        with pytest.raises(TypeError, match=r"[Mm]ultiple namespaces"):
            vc.vera_forward(strict.asarray(x), A, B, d, b)
