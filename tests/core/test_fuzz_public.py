"""Hypothesis fuzzing of every public function of ``vera_core``: no internal errors, ever.

Each function is called with arguments that are mostly a consistent layer (so the
calls reach past the first checks) with some replaced by random arrays (any shape,
including empty, and any dtype, integers and booleans included) or by junk (None,
strings, huge or negative integers, NaN). A call may succeed, or raise ``ValueError`` or
``TypeError`` (``AdapterFileError`` included) *from vera-core's own code*, with our own
message. Anything else (``IndexError``, ``AttributeError``, ``KeyError``,
``ZeroDivisionError``, a ``TypeError`` from inside NumPy, ...) fails the test.
``check=False`` (the backwards' fast path for arguments the forward already checked) is
not fuzzed: it trusts its caller by design. ``read_adapter`` is fuzzed with file contents
in ``tests/files/test_fuzz_files.py``.
"""

from __future__ import annotations

import inspect
import math
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vera_core as vc

CORE = str(Path(vc.__file__).resolve().parent)
FUNCTIONS = {
    name: getattr(vc, name) for name in vc.__all__ if inspect.isfunction(getattr(vc, name)) and name != "read_adapter"
}
DTYPES = [np.float32, np.float64, np.float16, np.int32, np.int64, np.bool_, np.uint8]
JUNK = [None, 0, -1, 2**70, 1.5, math.nan, "x", [], (), {}, object(), True]


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    """Any small array: 0 to 3 dimensions of 0 to 4, any listed dtype."""
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    values = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(shape)
    return values.astype(dtype)


@st.composite
def layer(draw: st.DrawFn) -> dict[str, Any]:
    """A consistent layer: every argument name of the public functions, with a valid value."""
    r = draw(st.integers(1, 4))
    rank = draw(st.integers(1, r))
    inp, out = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    max_in, max_out = inp + draw(st.integers(0, 2)), out + draw(st.integers(0, 2))
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    A, B = vc.generate_projections(0, r, max_in, max_out, xp=np, dtype=dtype)

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(dtype)

    values: dict[str, Any] = {
        "A": A,
        "B": B,
        "x": normal(*batch, inp),
        "base": normal(*batch, out),
        "weight": normal(out, inp),
        "bias": normal(out),
        "lambda_d": normal(rank),
        "lambda_b": normal(out),
        "magnitude": np.abs(normal(out)) + 0.5,
        "grad_y": normal(*batch, out),
        "u": normal(*batch, rank),
        "z": normal(*batch, out),
        "lambda_d_rows": normal(batch[0], rank),
        "lambda_b_rows": normal(batch[0], out),
        "magnitude_rows": np.abs(normal(batch[0], out)) + 0.5,
        "norm_rows": np.abs(normal(batch[0], out)) + 0.5,
        "dropout_mask": (rng.random((*batch, inp)) > 0.5).astype(dtype),
        "in_features": inp,
        "rank": rank,
        "tokens": int(np.prod(batch)),
        "out_features": out,
        "seed": draw(st.integers(0, 2**64 - 1)),
        "r": r,
        "max_in": max_in,
        "max_out": max_out,
        "matrix": draw(st.sampled_from([0, 1])),
        "shape": (r, max_in),
        "fan_in": max_in,
        "xp": np,
        "dtype": None,
        "device": None,
    }
    if draw(st.booleans()):
        values["x"] = values["x"][:0]  # an empty batch
    frozen = vc.dvora_precompute(values["weight"], A, rank)
    values["frozen"] = frozen
    values["norm"] = vc.dvora_norm(frozen, B, values["lambda_d"], values["lambda_b"])
    with np.errstate(all="ignore"):
        values["saved"] = vc.dvora_forward(
            values["x"],
            values["base"][: len(values["x"])],
            frozen,
            A,
            B,
            values["magnitude"],
            values["lambda_d"],
            values["lambda_b"],
        )[1]
    return values


def _raised_by_core(error: BaseException) -> bool:
    """Raised by a ``raise`` statement of vera-core (a message of ours), not by an operation inside it."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames or not str(Path(frames[-1].filename).resolve()).startswith(CORE):
        return False
    return (frames[-1].line or "").lstrip().startswith("raise ")


def _judge(name: str, call: Any) -> None:
    try:
        with np.errstate(all="ignore"):
            call()
    except (ValueError, TypeError) as error:
        if not _raised_by_core(error):
            raise AssertionError(f"{name}: {type(error).__name__} from outside vera_core: {error}") from error
    except Exception as error:  # the failure this test looks for
        raise AssertionError(f"{name}: internal error {type(error).__name__}: {error}") from error


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(values=layer(), data=st.data())
def test_public_function_has_no_internal_errors(name: str, values: dict[str, Any], data: st.DataObject) -> None:
    function = FUNCTIONS[name]
    arguments: dict[str, Any] = {}
    for parameter in inspect.signature(function).parameters.values():
        if parameter.name == "check":
            continue
        plausible = values.get(
            parameter.name, parameter.default if parameter.default is not inspect.Parameter.empty else None
        )
        if isinstance(parameter.default, bool):
            plausible = data.draw(st.booleans(), label=parameter.name)
        choice = data.draw(st.sampled_from(["plausible"] * 4 + ["array", "junk"]), label=f"{parameter.name} kind")
        if choice == "array":
            value = data.draw(arrays(), label=parameter.name)
        elif choice == "junk":
            value = data.draw(st.sampled_from(JUNK), label=parameter.name)
        else:
            value = plausible
        if parameter.default is inspect.Parameter.empty and value is inspect.Parameter.empty:
            value = None
        arguments[parameter.name] = value
    positional = [
        arguments.pop(p.name)
        for p in inspect.signature(function).parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name in arguments
    ]
    _judge(name, lambda: function(*positional, **arguments))
