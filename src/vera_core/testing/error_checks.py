"""Every documented error: the exception type and a message that says what to fix."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import vera_core as vc
from vera_core import projections
from vera_core._words import WordOps
from vera_core.testing._values import supported_floats
from vera_core.testing.cases import Case, Layer
from vera_core.threefry import threefry2x32

_CASE = Case(batch=(2,))


@dataclass
class Inputs:
    """A float32 :class:`Layer` of the error checks, with ways to spoil one argument."""

    layer: Layer
    other_device: Any = None

    @property
    def xp(self) -> Any:
        return self.layer.xp

    def array(self, value: Any, dtype: str = "float32") -> Any:
        """A new array from Python values on the layer's device."""
        return self.xp.asarray(value, dtype=getattr(self.xp, dtype), device=self.layer.device)

    def cast(self, name: str, dtype: str) -> Any:
        """The layer's array ``name`` converted to dtype ``dtype``."""
        return self.xp.astype(self.layer.arrays[name], getattr(self.xp, dtype))

    def vera(self, **changes: Any) -> Any:
        """:func:`vera_core.vera_forward` with some arguments replaced."""
        a = {**self.layer.arrays, **changes}
        return vc.vera_forward(a["x"], a["A"], a["B"], a["d"], a["b"], base=a.get("base"), dropout_mask=a.get("mask"))

    def vera_backward(self, **changes: Any) -> Any:
        """:func:`vera_core.vera_backward` with ``u`` from the forward, or replaced."""
        a = self.layer.arrays
        kwargs = {"u": self.vera()[1], "in_features": _CASE.in_features, **changes}
        return vc.vera_backward(a["grad"], A=a["A"], B=a["B"], lambda_d=a["d"], lambda_b=a["b"], **kwargs)

    def merge(self, merge: Callable[..., Any], weight: Any = None, **changes: Any) -> Any:
        """``merge`` (VeRA's or DVoRA's) of ``weight`` (default the layer's) with some vectors replaced."""
        a = {**self.layer.arrays, **changes}
        vectors = (a["m"], a["d"], a["b"]) if merge is vc.dvora_merge else (a["d"], a["b"])
        return merge(a["weight"] if weight is None else weight, a["A"], a["B"], *vectors, safe=True)

    def weight_with(self, value: float) -> Any:
        """The layer's weight with its first element replaced by ``value``."""
        rows = [list(row) for row in self.layer.values["W"]]
        rows[0][0] = value
        return self.array(rows)

    def dvora(self, rank: int = _CASE.rank, **changes: Any) -> Any:
        """:func:`vera_core.dvora_forward` (frozen part for ``rank``) with some arguments replaced."""
        a = {**self.layer.arrays, **changes}
        frozen = vc.dvora_precompute(self.layer.arrays["weight"], a["A"], rank)
        base = vc.linear(self.layer.arrays["x"], self.layer.arrays["weight"])
        return vc.dvora_forward(a["x"], base, frozen, a["A"], a["B"], a["m"], a["d"], a["b"])

    def dvora_unmerge(self, **changes: Any) -> Any:
        """:func:`vera_core.dvora_unmerge` of the layer's weight with some vectors replaced."""
        a = {**self.layer.arrays, **changes}
        norm = vc.dense_norm(a["weight"], a["A"], a["B"], a["d"], a["b"])
        return vc.dvora_unmerge(a["weight"], norm, a["A"], a["B"], a["m"], a["d"], a["b"])

    def generate(self, seed: Any = 0, r: Any = 2, dtype: Any = None) -> Any:
        """:func:`vera_core.generate_projections` on the layer's namespace and device."""
        return vc.generate_projections(seed, r, 3, 3, xp=self.xp, dtype=dtype, device=self.layer.device)


@dataclass(frozen=True)
class ErrorCase:
    """One misuse: calling ``call`` must raise ``exception`` with a message matching ``match``."""

    name: str
    exception: type[Exception]
    match: str
    call: Callable[[Inputs], Any]
    needs: str | None = None
    """"float64" or "two devices" when the misuse needs them."""


_R, _IN, _OUT = _CASE.shared_rank, _CASE.max_in, _CASE.max_out

ERROR_CASES = (
    ErrorCase("rank-0", ValueError, "rank must be positive", lambda i: i.vera(d=i.layer.arrays["d"][:0])),
    ErrorCase("no-outputs", ValueError, "at least one output", lambda i: i.vera(b=i.layer.arrays["b"][:0])),
    ErrorCase(
        "rank-above-shared", ValueError, "shared matrices have rank", lambda i: i.vera(d=i.array([0.1] * (_R + 1)))
    ),
    ErrorCase("wider-than-A", ValueError, "larger max_in", lambda i: i.vera(x=i.array([[1.0] * (_IN + 1)] * 2))),
    ErrorCase("taller-than-B", ValueError, "larger max_out", lambda i: i.vera(b=i.array([0.0] * (_OUT + 1)))),
    ErrorCase("A-not-2d", ValueError, "A must be", lambda i: i.vera(A=i.layer.arrays["A"][0, :])),
    ErrorCase(
        "A-B-rank-mismatch", ValueError, "both are the shared rank", lambda i: i.vera(B=i.layer.arrays["B"][:, 1:])
    ),
    ErrorCase("x-0d", ValueError, "x must have at least one dimension", lambda i: i.vera(x=i.array(1.0))),
    ErrorCase(
        "base-shape", ValueError, "base must have the shape", lambda i: i.vera(base=i.array([[0.0] * (_OUT + 1)] * 2))
    ),
    ErrorCase(
        "mask-shape", ValueError, "dropout_mask must have the shape", lambda i: i.vera(mask=i.array([[1.0] * 5]))
    ),
    ErrorCase("integer-x", TypeError, "real floating", lambda i: i.vera(x=i.cast("x", "int32"))),
    ErrorCase("integer-lambda_d", TypeError, "real floating", lambda i: i.vera(d=i.cast("d", "int32"))),
    ErrorCase(
        "A-B-dtypes",
        TypeError,
        "B must share a dtype with A or with the vectors",
        lambda i: i.vera(B=i.cast("B", "float64")),
        "float64",
    ),
    ErrorCase("vector-dtypes", TypeError, "lambda_d has dtype", lambda i: i.vera(b=i.cast("b", "float64")), "float64"),
    ErrorCase(
        "float64-vectors-float32-x",
        TypeError,
        "vectors must match",
        lambda i: i.vera(d=i.cast("d", "float64"), b=i.cast("b", "float64")),
        "float64",
    ),
    ErrorCase(
        "float32-vectors-float64-x",
        TypeError,
        "vectors must match",
        lambda i: i.vera(x=i.cast("x", "float64")),
        "float64",
    ),
    ErrorCase(
        "base-dtype", TypeError, "base has dtype", lambda i: i.vera(base=i.array([[0.0] * 4] * 2, "float64")), "float64"
    ),
    ErrorCase(
        "two-devices",
        ValueError,
        "device",
        lambda i: i.vera(b=i.xp.asarray([0.0] * 4, dtype=i.xp.float32, device=i.other_device)),
        "two devices",
    ),
    ErrorCase(
        "backward-u-shape", ValueError, "u must have the shape", lambda i: i.vera_backward(u=i.array([[0.0] * 4] * 2))
    ),
    ErrorCase(
        "backward-in-features-0",
        ValueError,
        "in_features must be a positive int",
        lambda i: i.vera_backward(in_features=0),
    ),
    ErrorCase(
        "merge-weight-rows", ValueError, "output features", lambda i: i.merge(vc.merge, b=i.layer.arrays["b"][1:])
    ),
    ErrorCase("merge-nan", ValueError, "NaN or infinity", lambda i: i.merge(vc.merge, i.weight_with(float("nan")))),
    ErrorCase("merge-inf", ValueError, "NaN or infinity", lambda i: i.merge(vc.merge, i.weight_with(float("inf")))),
    ErrorCase(
        "dvora-merge-nan", ValueError, "NaN or infinity", lambda i: i.merge(vc.dvora_merge, i.weight_with(float("nan")))
    ),
    ErrorCase(
        "magnitude-shape", ValueError, "magnitude must have the shape", lambda i: i.dvora(m=i.layer.arrays["m"][1:])
    ),
    ErrorCase(
        "magnitude-dtype", TypeError, "magnitude has dtype", lambda i: i.dvora(m=i.cast("m", "float64")), "float64"
    ),
    ErrorCase("frozen-rank", ValueError, "frozen.weight_proj", lambda i: i.dvora(rank=_CASE.rank - 1)),
    ErrorCase("precompute-rank-above-A", ValueError, "shared A has shape", lambda i: i.dvora(rank=_R + 1)),
    ErrorCase("precompute-rank-0", ValueError, "rank must be a positive int", lambda i: i.dvora(rank=0)),
    ErrorCase(
        "unmerge-zero-magnitude", ValueError, "magnitude has zeros", lambda i: i.dvora_unmerge(m=i.array([0.0] * 4))
    ),
    ErrorCase("seed-negative", ValueError, "seed must be", lambda i: i.generate(seed=-1)),
    ErrorCase("seed-too-large", ValueError, "seed must be", lambda i: i.generate(seed=2**64)),
    ErrorCase("seed-bool", ValueError, "seed must be", lambda i: i.generate(seed=True)),
    ErrorCase("projections-r-0", ValueError, "r must be a positive int", lambda i: i.generate(r=0)),
    ErrorCase("projections-integer-dtype", TypeError, "real floating", lambda i: i.generate(dtype=i.xp.int32)),
    ErrorCase(
        "unknown-matrix",
        ValueError,
        "matrix must be",
        lambda i: projections.kaiming_uniform(0, 2, (2, 2), 2, xp=i.xp, device=i.layer.device),
    ),
    ErrorCase(
        "threefry-key-range",
        ValueError,
        r"key\[0\] must be",
        lambda i: threefry2x32((2**32, 0), 0, 0, WordOps(i.xp, i.layer.device)),
    ),
)
"""Every misuse the core documents, with the exception and message it must give."""


def unavailable(case: ErrorCase, xp: Any, device: Any = None, other_device: Any = None) -> str | None:
    """Why ``case`` cannot run on ``xp`` and ``device`` (None when it can).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> case = next(c for c in ERROR_CASES if c.needs == "two devices")
    >>> unavailable(case, xp)
    'no second device to put an argument on'
    """
    if case.needs == "float64" and "float64" not in supported_floats(xp, device):
        return f"no float64 on device {device!r}"
    if case.needs == "two devices" and other_device is None:
        return "no second device to put an argument on"
    return None


def check_error_case(case: ErrorCase, xp: Any, device: Any = None, other_device: Any = None) -> None:
    """Raise AssertionError unless ``case`` raises its exception with its message.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> check_error_case(ERROR_CASES[0], xp)
    """
    inputs = Inputs(Layer.build(_CASE, xp, device), other_device)
    try:
        case.call(inputs)
    except case.exception as exc:
        if not re.search(case.match, str(exc)):
            raise AssertionError(f"{case.name}: message {str(exc)!r} does not say {case.match!r}") from exc
        return
    except Exception as exc:
        raise AssertionError(
            f"{case.name}: raised {type(exc).__name__}({exc}), expected {case.exception.__name__}"
        ) from exc
    raise AssertionError(f"{case.name}: nothing raised, expected {case.exception.__name__}")


def check_errors(xp: Any, device: Any = None, other_device: Any = None) -> None:
    """Every case of :data:`ERROR_CASES` that can run here raises as documented.

    Parameters
    ----------
    xp : namespace
        The Array API namespace under test.
    device : device, optional
        Where to put the arrays; default the namespace's default device.
    other_device : device, optional
        A second device of ``xp``, for the mixed-device error; without it that case is skipped.

    Raises
    ------
    AssertionError
        Naming the first case that raised nothing, the wrong exception or an unhelpful message.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> check_errors(xp, other_device=xp.Device("device1"))
    """
    for case in ERROR_CASES:
        if unavailable(case, xp, device, other_device) is None:
            check_error_case(case, xp, device, other_device)
