"""Test problems: one adapted layer with seeded data, materialised on a backend, and its reference.

A :class:`Case` fixes the sizes and options; :meth:`Layer.build` puts its data on a
namespace and device in a dtype and reads back the exact stored values, which the pure
Python oracle (:mod:`vera_core.testing.reference`) then uses. Tolerances follow the
usual rounding-error bound ``n * eps * sum |terms|``: ``n`` is :attr:`Case.terms`, ``eps``
the activations' machine epsilon (plus float64's, for the oracle's own rounding), and
``sum |terms|`` the same formula evaluated on the absolute values of every input
(:meth:`Layer.output_bound`, :meth:`Layer.grad_bounds`); for DVoRA it also covers the
rounding of the norm (:meth:`Layer.bounding_norm`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Any

from vera_core.testing import reference as ref
from vera_core.testing._values import HALF_NAMES, absolute, eps, to_nested

SLACK = 8
"""Roundings outside the accumulations (casts, the fold, scaling, bias, the norm) in every bound."""

FD_EPS = 2.0**-52
"""float64 machine epsilon: the oracle and its finite differences run in float64."""

FD_STEP = FD_EPS ** (1 / 3)
"""Relative step of the central differences (balances truncation and round-off)."""

ADAPTER_PARAMS = {"vera": ("x", "d", "b"), "dvora": ("x", "d", "b", "m")}
"""The trainable inputs (and ``x``) whose gradients each method's backward returns."""


@dataclass(frozen=True)
class Case:
    """Sizes and options of one adapted layer; small enough for the pure-Python oracle.

    Examples
    --------
    >>> Case(batch=(), rank=1).tokens
    1
    """

    batch: tuple[int, ...] = (2, 3)
    """Leading dimensions of the activations (``()`` for a single 1-D input)."""
    in_features: int = 5
    out_features: int = 4
    rank: int = 3
    shared_rank: int = 4
    max_in: int = 6
    max_out: int = 5
    dropout: bool = False
    bias: bool = False
    fan_in_fan_out: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not (
            1 <= self.rank <= self.shared_rank
            and 1 <= self.in_features <= self.max_in
            and 1 <= self.out_features <= self.max_out
        ):
            raise ValueError(f"inconsistent case {self}")

    @property
    def tokens(self) -> int:
        return math.prod(self.batch)

    @property
    def terms(self) -> int:
        """Roundings along the longest accumulation of any output or gradient."""
        return self.tokens + self.in_features + self.out_features + self.shared_rank + SLACK


def _data(case: Case) -> dict[str, Any]:
    """Seeded data of a case in float64, in the oracle's layout (weight (out, in), tokens flat)."""
    rng = random.Random(case.seed)

    def matrix(rows: int, cols: int, draw: Any) -> list[list[float]]:
        return [[draw() for _ in range(cols)] for _ in range(rows)]

    def uniform(bound: float) -> Any:
        return lambda: rng.uniform(-bound, bound)

    def normal(sigma: float) -> Any:
        return lambda: rng.gauss(0.0, sigma)

    c = case
    W = matrix(c.out_features, c.in_features, normal(c.in_features**-0.5))
    return {
        "x": matrix(c.tokens, c.in_features, normal(1.0)),
        "W": W,
        "A": matrix(c.shared_rank, c.max_in, uniform(math.sqrt(6 / c.max_in))),
        "B": matrix(c.max_out, c.shared_rank, uniform(math.sqrt(6 / c.shared_rank))),
        "d": [rng.uniform(-0.5, 0.5) for _ in range(c.rank)],
        "b": [rng.gauss(0.0, 0.5) for _ in range(c.out_features)],
        "m": [norm * rng.uniform(0.5, 1.5) for norm in ref.row_norms(W)],
        "grad": matrix(c.tokens, c.out_features, normal(1.0)),
        "mask": matrix(c.tokens, c.in_features, lambda: rng.choice((0.0, 2.0))) if c.dropout else None,
        "bias": [rng.gauss(0.0, 1.0) for _ in range(c.out_features)] if c.bias else None,
    }


_ACTIVATION_LIKE = ("x", "grad", "mask")
_VECTOR_LIKE = ("A", "B", "d", "b", "m")


@dataclass
class Layer:
    """A :class:`Case` on a namespace and device: ``arrays`` and the ``values`` they hold exactly.

    ``arrays`` has ``x`` and ``mask`` (``(*batch, in)``), ``grad`` (``(*batch, out)``), ``weight``
    (``(out, in)`` or ``(in, out)`` with ``fan_in_fan_out``) and ``bias`` in the activation
    dtype; ``A``, ``B``, ``d``, ``b`` and ``m`` in the vector dtype (float32 beside 16-bit
    activations). ``values`` holds the same numbers as Python floats, ``W`` as (out, in)
    and activations as token rows.
    """

    case: Case
    xp: Any
    device: Any
    dtype: str
    vector_dtype: str
    arrays: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, case: Case, xp: Any, device: Any = None, dtype: str = "float32") -> Layer:
        """Materialise ``case`` with activations of dtype ``dtype`` (a name such as "float64").

        Examples
        --------
        >>> import array_api_strict as xp
        >>> layer = Layer.build(Case(batch=(2,)), xp)
        >>> layer.arrays["x"].shape, len(layer.values["x"])
        ((2, 5), 2)
        """
        layer = cls(case, xp, device, dtype, "float32" if dtype in HALF_NAMES else dtype)
        for name, value in _data(case).items():
            if value is not None:
                layer.put(name, value)
        return layer

    def put(self, name: str, value: Any) -> None:
        """Store ``value`` (oracle layout) as array ``name``, and the values it rounds to."""
        xp, c = self.xp, self.case
        dtype = getattr(xp, self.vector_dtype if name in _VECTOR_LIKE else self.dtype)
        if name == "W":
            stored = [list(col) for col in zip(*value, strict=True)] if c.fan_in_fan_out else value
            self.arrays["weight"] = xp.asarray(stored, dtype=dtype, device=self.device)
            self.values["W"] = self.weight_values(self.arrays["weight"])
            return
        array = xp.asarray(value, dtype=dtype, device=self.device)
        self.values[name] = to_nested(array)
        if name in _ACTIVATION_LIKE:
            array = xp.reshape(array, (*c.batch, array.shape[-1]))
        self.arrays[name] = array

    def with_values(self, **values: Any) -> Layer:
        """A copy with some data replaced (oracle layout), e.g. ``b=[0.0] * out``; None removes it."""
        layer = replace(self, arrays=dict(self.arrays), values=dict(self.values))
        for name, value in values.items():
            if value is None:
                layer.arrays.pop(name, None)
                layer.values.pop(name, None)
            else:
                layer.put(name, value)
        return layer

    def rows(self, array: Any) -> list[list[float]]:
        """The values of an activation-like array (``(*batch, f)``) as token rows."""
        return to_nested(self.xp.reshape(array, (self.case.tokens, array.shape[-1])))

    def weight_values(self, weight: Any) -> list[list[float]]:
        """The values of a weight array in the oracle's (out, in) layout."""
        values = to_nested(weight)
        return [list(col) for col in zip(*values, strict=True)] if self.case.fan_in_fan_out else values

    @property
    def eps(self) -> float:
        """Machine epsilon of the activations (the coarsest dtype in play)."""
        return eps(self.xp, self.dtype)

    def tolerance(self, bound: Any, extra: float = 0.0, *, computations: int = 1) -> Any:
        """Elementwise ``terms * (computations * eps + eps64) * bound + extra`` for a nested ``bound``.

        ``eps`` covers each of ``computations`` results under test that are compared (each
        within the rounding bound of the exact value), ``eps64`` the float64 oracle's rounding.
        """
        if isinstance(bound, list):
            return [self.tolerance(item, extra, computations=computations) for item in bound]
        return self.case.terms * (computations * self.eps + FD_EPS) * bound + extra

    def reference(self, method: str, values: dict[str, Any] | None = None, norm: Any = None) -> list[list[float]]:
        """The oracle's output of ``method`` ("vera" or "dvora") on ``values`` (default the stored ones)."""
        v = self.values if values is None else values
        if method == "vera":
            return ref.vera_forward(
                v["x"], v["W"], v["A"], v["B"], v["d"], v["b"], bias=v.get("bias"), mask=v.get("mask")
            )
        return ref.dvora_forward(
            v["x"], v["W"], v["A"], v["B"], v["m"], v["d"], v["b"], bias=v.get("bias"), mask=v.get("mask"), norm=norm
        )

    def norm(self) -> list[float]:
        """The oracle's ``n = ||W0 + dW||`` per output row."""
        v = self.values
        return ref.row_norms(ref.adapted_weight(v["W"], v["A"], v["B"], v["d"], v["b"]))

    def norm_conditions(self) -> list[float]:
        """``n_abs**2 / n**2`` per row, ``n_abs`` the norm of ``W0 + dW`` on absolute values.

        The squared norm sums terms (in either form) whose absolute values add up to at most
        ``n_abs**2``, so ``n`` carries a relative rounding error up to ``terms * eps`` times this.
        """
        magnitudes = self.absolute_values()
        n_abs = ref.row_norms(ref.adapted_weight(*(magnitudes[k] for k in ("W", "A", "B", "d", "b"))))
        return [(s / t) ** 2 for s, t in zip(n_abs, self.norm(), strict=True)]

    def bounding_norm(self) -> list[float]:
        """``n / (1 + n_abs**2 / n**2)``: held in the absolute-value evaluations of DVoRA.

        It scales ``m / n`` by ``1 + n_abs**2 / n**2``, so that the bounds also cover the
        rounding of ``n`` (see :meth:`norm_conditions`).
        """
        return [t / (1.0 + c) for t, c in zip(self.norm(), self.norm_conditions(), strict=True)]

    def absolute_values(self) -> dict[str, Any]:
        """Every stored value replaced by its absolute value (for error bounds)."""
        return {name: absolute(value) for name, value in self.values.items()}

    def output_bound(self, method: str) -> list[list[float]]:
        """``sum |terms|`` of each output: the oracle on absolute values (DVoRA: at :meth:`bounding_norm`)."""
        return self.reference(method, self.absolute_values(), norm=self.bounding_norm() if method == "dvora" else None)

    def grad_names(self, method: str) -> tuple[str, ...]:
        """The inputs whose gradients ``method``'s backward returns (``bias`` for DVoRA with a bias)."""
        return ADAPTER_PARAMS[method] + (("bias",) if method == "dvora" and self.case.bias else ())

    def loss(self, method: str, values: dict[str, Any], norm: Any = None) -> float:
        """``sum(grad * y)`` of the oracle's output on ``values`` (``norm`` held, for DVoRA, if given)."""
        return ref.weighted_sum(values["grad"], self.reference(method, values, norm=norm))

    def _norm_path_bound(self) -> Any:
        """A function of the data whose derivatives at the absolute values bound the gradient through ``n``.

        Through the norm, ``dL/dtheta = -sum_o m_o q_o / n_o**3 (V_o . dV_o/dtheta)`` with
        ``V = W0 + dW`` and ``q_o = sum_t grad_to z_to``. With every factor replaced by its
        absolute value this is the derivative of ``sum_o c_o ||V_o||**2 / 2``, with
        ``c_o = |m_o| q_abs_o / n_o**3`` (``n`` at :meth:`bounding_norm`).
        """
        magnitudes = self.absolute_values()
        v = magnitudes
        z = ref.vera_forward(v["x"], v["W"], v["A"], v["B"], v["d"], v["b"], mask=v.get("mask"))
        q = [sum(g_row[o] * z_row[o] for g_row, z_row in zip(v["grad"], z, strict=True)) for o in range(len(v["m"]))]
        c = [m * qo / t**3 for m, qo, t in zip(v["m"], q, self.bounding_norm(), strict=True)]

        def bound(values: dict[str, Any]) -> float:
            V = ref.adapted_weight(*(values[k] for k in ("W", "A", "B", "d", "b")))
            return sum(co * sum(w * w for w in row) / 2 for co, row in zip(c, V, strict=True))

        return bound

    def grad_bounds(self, method: str, *, detach_norm: bool = False) -> tuple[dict[str, list], float]:
        """``sum |terms|`` of each gradient element, and of the loss.

        Central differences at the absolute values of the loss on absolute values (the norm
        held at :meth:`bounding_norm`) and, for exact DVoRA, of :meth:`_norm_path_bound`.
        """
        names = self.grad_names(method)
        magnitudes = self.absolute_values()
        held = self.bounding_norm() if method == "dvora" else None
        bounds = ref.central_differences(lambda v: self.loss(method, v, held), magnitudes, names, FD_STEP)
        total = self.loss(method, magnitudes, held)
        if method == "dvora" and not detach_norm:
            path = self._norm_path_bound()
            through = ref.central_differences(path, magnitudes, ("d", "b"), FD_STEP)
            for name in ("d", "b"):
                bounds[name] = [p + q for p, q in zip(bounds[name], through[name], strict=True)]
            total += path(magnitudes)
        return bounds, total

    def grad_tolerances(self, method: str, *, detach_norm: bool = False, extra: float = 0.0) -> dict[str, Any]:
        """The rounding tolerance of each gradient (:meth:`grad_bounds`), plus ``extra``."""
        bounds, _ = self.grad_bounds(method, detach_norm=detach_norm)
        return {name: self.tolerance(bound, extra) for name, bound in bounds.items()}

    def finite_difference_grads(
        self, method: str, *, detach_norm: bool = False
    ) -> tuple[dict[str, list], dict[str, Any]]:
        """Central differences of ``sum(grad * y)`` on the oracle, and the tolerance of each gradient.

        With ``detach_norm`` the loss holds ``n`` at its value (DoRA section 4.3). The
        tolerance adds the differences' own error to the rounding bound: the Richardson
        combination ``(4 D(h) - D(2h)) / 3`` carries ``1.5 eps64 / h = 1.5 eps64**(2/3)``
        of round-off per unit of the loss's ``sum |terms|`` (times ``terms``), and its
        O(h^4) truncation (about ``eps64**(4/3)``) is negligible beside it.
        """
        norm = self.norm() if method == "dvora" and detach_norm else None
        names = self.grad_names(method)
        expected = ref.central_differences(lambda v: self.loss(method, v, norm), self.values, names, FD_STEP)
        bounds, total = self.grad_bounds(method, detach_norm=detach_norm)
        fd_error = 1.5 * self.case.terms * FD_EPS ** (2 / 3) * total
        return expected, {name: self.tolerance(bound, fd_error) for name, bound in bounds.items()}


DEFAULT_CASE = Case()
"""Leading dimensions, a rank below the shared rank, a layer smaller than the shared matrices."""

CONFORMANCE_CASES = (
    DEFAULT_CASE,
    Case(batch=(3,), dropout=True, bias=True, fan_in_fan_out=True, seed=1),
    Case(batch=(), in_features=1, out_features=1, rank=1, shared_rank=1, max_in=1, max_out=1, seed=2),
)
"""The layers :func:`vera_core.testing.check_namespace` runs: the default; dropout, bias and a
transposed weight; every size 1."""
