"""DVoRA: DoRA's magnitude/direction split with VeRA's delta weight.

``W' = m * (W0 + dW) / n`` with ``n_i = ||W0_i + dW_i||`` over each output row, so
``y = (m / n) * (x W0^T + x dW^T) + bias``. With ``C = diag(lambda_b) B_s diag(lambda_d)``
(out x r) and ``dW = C A_s``, the squared norms need no (out x in) matrix per step:

``n_i^2 = ||W0_i||^2 + 2 (W0 A_s^T)_i . C_i + C_i (A_s A_s^T) C_i^T``

with ``||W0_i||^2``, ``W0 A_s^T`` (out x r) and ``A_s A_s^T`` (r x r) computed once per
layer by :func:`dvora_precompute` (in float32 or wider): O(out r^2) per step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from vera_core import _lowrank as lr
from vera_core._fused import clamp_min, matmul_add, scale_add, sub_product
from vera_core._validation import (
    AdapterShape,
    check_activations,
    check_adapter,
    check_finite,
    check_ndim,
    check_positive_int,
    check_real_float_dtype,
    check_same_device,
    check_same_shape,
    check_vector_dtype,
    namespace,
    optional_arrays,
    require_arrays,
    require_flags,
)
from vera_core.segments import segment_sum, take_rows
from vera_core.vera import _check_whole_layer


class DvoraFrozen(NamedTuple):
    """What a DVoRA layer precomputes from its frozen weight (see :func:`dvora_precompute`)."""

    weight_sq_norm: Any
    """``||W0_i||^2`` for each output row, shape (out,)."""
    weight_proj: Any
    """``W0 A_s^T``, shape (out, r)."""
    gram: Any
    """``A_s A_s^T``, shape (r, r)."""


class DvoraSaved(NamedTuple):
    """What :func:`dvora_forward` keeps for :func:`dvora_backward`."""

    u: Any
    """``(x * mask) A_s^T``, shape (..., r)."""
    z: Any
    """``x W0^T + x dW^T`` before scaling and bias, shape (..., out)."""
    norm: Any
    """``n = ||W0 + dW||`` per output row, shape (out,)."""


class DvoraGrads(NamedTuple):
    """Gradients of a DVoRA layer."""

    x: Any
    """``dL/dx`` through the adapter path only (None when not asked for)."""
    base: Any
    """``dL/d(x W0^T)``: push it through the frozen layer for its share of ``dL/dx``."""
    magnitude: Any
    lambda_d: Any
    lambda_b: Any
    bias: Any
    """``dL/dbias`` (None when no bias was given)."""


def _row_sq_norms(xp: Any, weight: Any, fan_in_fan_out: bool) -> Any:
    return xp.sum(weight * weight, axis=0 if fan_in_fan_out else 1)


def initial_magnitude(weight: Any, *, fan_in_fan_out: bool = False, dtype: Any = None) -> Any:
    """``||W0_i||`` for each output row: the magnitude that leaves the layer unchanged.

    Parameters
    ----------
    weight : array
        (out, in), or (in, out) with ``fan_in_fan_out``.
    fan_in_fan_out : bool
        The weight is stored transposed.
    dtype : dtype, optional
        Result dtype; default the weight's dtype widened to at least float32.

    Examples
    --------
    >>> import numpy as xp
    >>> initial_magnitude(xp.asarray([[3.0, 4.0], [0.0, 1.0]], dtype=xp.float32))
    array([5., 1.], dtype=float32)
    """
    require_arrays(weight=weight)
    require_flags(fan_in_fan_out=fan_in_fan_out)
    xp = namespace(weight)
    lr.weight_shape(weight, fan_in_fan_out)
    check_real_float_dtype(xp, weight.dtype, "weight")
    if dtype is not None:
        check_real_float_dtype(xp, dtype, "dtype")
    work = lr.wider(xp, weight.dtype) if dtype is None else dtype
    return xp.sqrt(_row_sq_norms(xp, lr.cast(xp, weight, work), fan_in_fan_out))


def dvora_precompute(weight: Any, A: Any, rank: int, *, fan_in_fan_out: bool = False) -> DvoraFrozen:
    """The frozen quantities of the Gram-form norm, in float32 or wider.

    Parameters
    ----------
    weight : array
        The frozen weight W0, (out, in) or (in, out) with ``fan_in_fan_out``.
    A : array
        The shared matrix A (R x max_in).
    rank : int
        The layer's rank ``r <= R``.
    fan_in_fan_out : bool
        The weight is stored transposed.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> frozen = dvora_precompute(xp.ones((6, 8)), A, 4)
    >>> frozen.weight_proj.shape, frozen.gram.shape
    ((6, 4), (4, 4))
    """
    require_arrays(weight=weight, A=A)
    require_flags(fan_in_fan_out=fan_in_fan_out)
    check_positive_int("rank", rank)
    xp = namespace(weight, A)
    check_real_float_dtype(xp, weight.dtype, "weight")
    check_real_float_dtype(xp, A.dtype, "A")
    check_ndim("A", A, 2, "the shared matrix A (rank x max_in)")
    _, in_features = lr.weight_shape(weight, fan_in_fan_out)
    if rank > A.shape[0] or in_features > A.shape[1]:
        raise ValueError(f"the layer needs A[:{rank}, :{in_features}] but the shared A has shape {tuple(A.shape)}")
    work = lr.wider(xp, weight.dtype, A.dtype)
    W0 = lr.cast(xp, weight, work)
    A_s = lr.cast(xp, A[:rank, :in_features], work)
    W_rows = W0.T if fan_in_fan_out else W0
    return DvoraFrozen(_row_sq_norms(xp, W_rows, False), xp.matmul(W_rows, A_s.T), xp.matmul(A_s, A_s.T))


def _require_structures(frozen: Any, *saved: Any) -> None:
    """TypeError unless ``frozen`` is a DvoraFrozen (and ``saved``, when given, a DvoraSaved) of arrays."""
    given = [("frozen", frozen, DvoraFrozen)] + [("saved", value, DvoraSaved) for value in saved]
    for name, value, kind in given:
        if not isinstance(value, kind):
            raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
        require_arrays(**{f"{name}.{field}": getattr(value, field) for field in kind._fields})


def _check_frozen(frozen: DvoraFrozen, out_features: int, rank: int) -> None:
    xp = namespace(*frozen)
    for field in DvoraFrozen._fields:
        check_real_float_dtype(xp, getattr(frozen, field).dtype, f"frozen.{field}")
    check_same_shape("frozen.weight_sq_norm", frozen.weight_sq_norm, (out_features,), "(out,)")
    check_same_shape("frozen.weight_proj", frozen.weight_proj, (out_features, rank), "(out, rank)")
    check_same_shape("frozen.gram", frozen.gram, (rank, rank), "(rank, rank)")


def _gram_norm(xp: Any, frozen: DvoraFrozen, C: Any) -> Any:
    """The row norms from ``C`` (out x r), or from a stack of them (n x out x r: one norm row each)."""
    work = frozen.weight_proj.dtype
    Cw = lr.cast(xp, C, work)
    # n^2 = ||W0_i||^2 + C_i . (2 W0 A_s^T + C A_s A_s^T)_i
    if Cw.ndim == 2:
        inner = matmul_add(xp, frozen.weight_proj, Cw, frozen.gram, beta=2.0)
    else:
        inner = 2.0 * frozen.weight_proj + xp.matmul(Cw, frozen.gram)
    sq = frozen.weight_sq_norm + xp.sum(Cw * inner, axis=-1)
    return xp.sqrt(clamp_min(xp, sq, float(xp.finfo(work).smallest_normal)))


def dvora_norm(frozen: DvoraFrozen, B: Any, lambda_d: Any, lambda_b: Any) -> Any:
    """``n_i = ||W0_i + dW_i||`` in the Gram form, in float32 or wider.

    The squared norm is clamped below at the smallest normal number of its dtype, so
    ``n`` is never zero (a zero row gives ``m = 0`` and so a zero output).

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> W = xp.ones((6, 8))
    >>> n = dvora_norm(dvora_precompute(W, A, 4), B, xp.full(4, 0.1), xp.zeros(6))
    >>> bool(xp.all(xp.abs(n - initial_magnitude(W)) < 1e-6))
    True
    """
    _require_structures(frozen)
    require_arrays(B=B, lambda_d=lambda_d, lambda_b=lambda_b)
    xp = namespace(frozen.gram, B, lambda_d, lambda_b)
    check_ndim("lambda_d", lambda_d, 1, "a vector of length rank")
    check_ndim("lambda_b", lambda_b, 1, "a vector of length out_features")
    check_ndim("B", B, 2, "the shared matrix B (max_out x rank)")
    rank, out_features = lambda_d.shape[0], lambda_b.shape[0]
    if rank > B.shape[1] or out_features > B.shape[0]:
        raise ValueError(f"the layer needs B[:{out_features}, :{rank}] but the shared B has shape {tuple(B.shape)}")
    _check_frozen(frozen, out_features, rank)
    C = lr.fold(xp, B[:out_features, :rank], lambda_d, lambda_b)
    return _gram_norm(xp, frozen, C)


def dvora_norm_rows(frozen: DvoraFrozen, B: Any, lambda_d_rows: Any, lambda_b_rows: Any) -> Any:
    """:func:`dvora_norm` of several adapters at once: one row of norms per row of vectors.

    Parameters
    ----------
    frozen : DvoraFrozen
        The layer's frozen pieces (:func:`dvora_precompute`) for rank ``r``.
    B : array
        The shared B (max_out x R).
    lambda_d_rows : array, shape (n, r)
    lambda_b_rows : array, shape (n, out)

    Returns
    -------
    array, shape (n, out)
        In float32 or wider, as :func:`dvora_norm`.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> frozen = dvora_precompute(xp.ones((6, 8)), A, 4)
    >>> d, b = xp.full((2, 4), 0.1), xp.stack([xp.zeros(6), xp.ones(6)])
    >>> rows = dvora_norm_rows(frozen, B, d, b)
    >>> bool(xp.allclose(rows[1], dvora_norm(frozen, B, d[1], b[1])))
    True
    """
    _require_structures(frozen)
    require_arrays(B=B, lambda_d_rows=lambda_d_rows, lambda_b_rows=lambda_b_rows)
    xp = namespace(frozen.gram, B, lambda_d_rows, lambda_b_rows)
    check_ndim("lambda_d_rows", lambda_d_rows, 2, "(n, rank)")
    check_ndim("lambda_b_rows", lambda_b_rows, 2, "(n, out_features)")
    if lambda_d_rows.shape[0] != lambda_b_rows.shape[0]:
        raise ValueError(
            f"lambda_d_rows has {lambda_d_rows.shape[0]} rows but lambda_b_rows has {lambda_b_rows.shape[0]}"
        )
    rank, out_features = lambda_d_rows.shape[1], lambda_b_rows.shape[1]
    _check_frozen(frozen, out_features, rank)
    check_ndim("B", B, 2, "the shared matrix B (max_out x rank)")
    if out_features > B.shape[0] or rank > B.shape[1]:
        raise ValueError(f"the rows need B[:{out_features}, :{rank}] but the shared B has shape {tuple(B.shape)}")
    C_rows = lr.fold_rows(xp, B[:out_features, :rank], lambda_d_rows, lambda_b_rows)
    return _gram_norm(xp, frozen, C_rows)


def dense_norm(weight: Any, A: Any, B: Any, lambda_d: Any, lambda_b: Any, *, fan_in_fan_out: bool = False) -> Any:
    """``||W0 + dW||`` per output row, forming ``dW``: the reference for :func:`dvora_norm`.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> dense_norm(xp.ones((6, 8)), A, B, xp.full(4, 0.1), xp.zeros(6)).shape
    (6,)
    """
    return _direction(weight, A, B, lambda_d, lambda_b, fan_in_fan_out)[1]


def _direction(weight: Any, A: Any, B: Any, lambda_d: Any, lambda_b: Any, fan_in_fan_out: bool) -> tuple[Any, Any, Any]:
    """``(V, n, xp)``: ``V = W0 + dW`` in the working dtype, its row norms."""
    require_arrays(weight=weight, A=A, B=B, lambda_d=lambda_d, lambda_b=lambda_b)
    require_flags(fan_in_fan_out=fan_in_fan_out)
    xp, shape = lr.check_on_weight(A, B, lambda_d, lambda_b, weight, fan_in_fan_out)
    A_s, B_s = lr.layer_slices(A, B, shape)
    V = lr.shifted_weight(xp, weight, lr.fold(xp, B_s, lambda_d, lambda_b), A_s, fan_in_fan_out)
    return V, xp.sqrt(_row_sq_norms(xp, V, fan_in_fan_out)), xp


def _check_dvora_layer(magnitude: Any, lambda_d: Any, frozen: DvoraFrozen, bias: Any, shape: AdapterShape) -> None:
    """The DVoRA-only arguments of one layer: magnitude, frozen quantities, bias."""
    _check_magnitude(magnitude, lambda_d, shape.out_features)
    _check_frozen(frozen, shape.out_features, shape.rank)
    if bias is not None:
        check_same_shape("bias", bias, (shape.out_features,), "lambda_b")


def _check_magnitude(magnitude: Any, lambda_d: Any, out_features: int) -> None:
    check_ndim("magnitude", magnitude, 1, "a vector of length out_features")
    check_same_shape("magnitude", magnitude, (out_features,), "lambda_b")
    if magnitude.dtype != lambda_d.dtype:
        raise TypeError(f"magnitude has dtype {magnitude.dtype} but lambda_d has {lambda_d.dtype}")


def dvora_forward(
    x: Any,
    base: Any,
    frozen: DvoraFrozen,
    A: Any,
    B: Any,
    magnitude: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    bias: Any = None,
    dropout_mask: Any = None,
) -> tuple[Any, DvoraSaved]:
    """The DVoRA output ``(m / n) * (base + x_drop dW^T) + bias``.

    Parameters
    ----------
    x : array, shape (..., in)
        Layer input.
    base : array, shape (..., out)
        ``x W0^T`` *without* the bias (see :func:`vera_core.linear`).
    frozen : DvoraFrozen
        From :func:`dvora_precompute`.
    A, B : array
        The shared projections.
    magnitude : array, shape (out,)
        Trainable magnitude ``m``, in the vectors' dtype.
    lambda_d, lambda_b : array
        As in :func:`vera_core.vera_forward`.
    bias : array, shape (out,), optional
        The layer's bias, added after scaling.
    dropout_mask : array, shape (..., in), optional
        Multiplies ``x`` on the adapter path only (as in PEFT's DoRA).

    Returns
    -------
    y : array, shape (..., out)
    saved : DvoraSaved
        ``u`` (..., r), ``z`` (..., out) and ``n`` (out,) for :func:`dvora_backward`.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections, linear
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> W, x = xp.ones((6, 8)), xp.ones((3, 8))
    >>> frozen = dvora_precompute(W, A, 4)
    >>> m = initial_magnitude(W)
    >>> y, saved = dvora_forward(x, linear(x, W), frozen, A, B, m, xp.full(4, 0.1), xp.zeros(6))
    >>> bool(xp.all(xp.abs(y - linear(x, W)) < 1e-5))
    True
    """
    require_arrays(x=x, base=base, A=A, B=B, magnitude=magnitude, lambda_d=lambda_d, lambda_b=lambda_b)
    optional_arrays(bias=bias, dropout_mask=dropout_mask)
    _require_structures(frozen)
    xp, shape = check_adapter(
        A,
        B,
        lambda_d,
        lambda_b,
        x.shape[-1] if x.ndim else 0,
        activation_dtype=x.dtype,
        extra={"x": x, "base": base, "magnitude": magnitude, "bias": bias, "dropout_mask": dropout_mask},
    )
    check_activations("x", x, shape.in_features, "in_features on the last axis")
    check_same_shape("base", base, (*x.shape[:-1], shape.out_features), "x with out_features last")
    if dropout_mask is not None:
        check_same_shape("dropout_mask", dropout_mask, tuple(x.shape), "x")
    _check_dvora_layer(magnitude, lambda_d, frozen, bias, shape)
    A_s, B_s = lr.layer_slices(A, B, shape)
    C = lr.fold(xp, B_s, lambda_d, lambda_b)
    norm = _gram_norm(xp, frozen, C)
    u = lr.project(xp, x, A_s, dropout_mask)
    z = lr.add_product(xp, base, u, C)
    return _scaled(xp, z, magnitude, norm, bias), DvoraSaved(u, z, norm)


def _scaled(xp: Any, z: Any, magnitude: Any, norm: Any, bias: Any) -> Any:
    """``(m / n) * z + bias`` in the dtype of ``z`` (``m / n`` divided in the vectors' dtype)."""
    scale = lr.cast(xp, magnitude / lr.cast(xp, norm, magnitude.dtype), z.dtype)
    return scale_add(xp, z, scale, None if bias is None else lr.cast(xp, bias, z.dtype))


def dvora_rows_output(z: Any, magnitude_rows: Any, norm_rows: Any, *, bias: Any = None) -> Any:
    """``(m / n) * z + bias`` with each leading row's own adapter (mixed-adapter batches).

    Row ``i`` of ``z`` is ``x_i W0^T`` plus that row's adapter term
    (:func:`vera_core.vera_delta_rows`); ``magnitude_rows[i]`` and ``norm_rows[i]`` are
    that adapter's ``m`` and ``n`` (:func:`dvora_norm`). Rows served by a VeRA adapter, or
    by none, carry ones in both, and get ``z + bias``.

    Parameters
    ----------
    z : array, shape (batch, ..., out)
        The unscaled output, without the bias.
    magnitude_rows, norm_rows : array, shape (batch, out)
        Per row, in the vectors' dtype (the dtype of ``z``, or float32 beside 16-bit ``z``).
    bias : array, shape (out,), optional
        Added after scaling.

    Returns
    -------
    array, shape (batch, ..., out)
        In the dtype of ``z``; ``m / n`` is divided in the vectors' dtype.

    Examples
    --------
    >>> import numpy as xp
    >>> z = xp.ones((2, 3, 4))
    >>> m = xp.stack([xp.full(4, 2.0), xp.ones(4)])  # row 0: a DVoRA adapter, row 1: none
    >>> n = xp.stack([xp.full(4, 4.0), xp.ones(4)])
    >>> y = dvora_rows_output(z, m, n, bias=xp.full(4, 0.5))
    >>> float(y[0, 0, 0]), float(y[1, 0, 0])
    (1.0, 1.5)
    """
    require_arrays(z=z, magnitude_rows=magnitude_rows, norm_rows=norm_rows)
    optional_arrays(bias=bias)
    xp = namespace(*(a for a in (z, magnitude_rows, norm_rows, bias) if a is not None))
    if z.ndim < 2:
        raise ValueError(f"z must have shape (batch, ..., out), got {tuple(z.shape)}")
    batch, out_features = z.shape[0], z.shape[-1]
    for name, rows in (("magnitude_rows", magnitude_rows), ("norm_rows", norm_rows)):
        check_same_shape(name, rows, (batch, out_features), "(batch, out_features) of z")
        check_real_float_dtype(xp, rows.dtype, name)
    if norm_rows.dtype != magnitude_rows.dtype:
        raise TypeError(f"norm_rows has dtype {norm_rows.dtype} but magnitude_rows has {magnitude_rows.dtype}")
    check_real_float_dtype(xp, z.dtype, "z")
    check_vector_dtype(xp, magnitude_rows.dtype, z.dtype)
    if bias is not None:
        check_same_shape("bias", bias, (out_features,), "(out_features,)")
    check_same_device({"z": z, "magnitude_rows": magnitude_rows, "norm_rows": norm_rows, "bias": bias})
    per_row = (batch,) + (1,) * (z.ndim - 2) + (out_features,)  # broadcast over the tokens of each row
    return _scaled(xp, z, xp.reshape(magnitude_rows, per_row), xp.reshape(norm_rows, per_row), bias)


class DvoraRowsGrads(NamedTuple):
    """Gradients of a mixed-adapter batch's DVoRA scaling (see :func:`dvora_rows_backward`)."""

    z: Any
    """``dL/dz`` (batch, ..., out): push it through :func:`vera_core.vera_rows_backward` and the frozen layer."""
    magnitude: Any
    """``dL/dm`` (k, out), one row per adapter."""
    lambda_d: Any
    """``dL/dlambda_d`` (k, r) through the norm only (zero where the norm is detached)."""
    lambda_b: Any
    """``dL/dlambda_b`` (k, out) through the norm only (zero where the norm is detached)."""


def dvora_rows_backward(
    grad_y: Any,
    z: Any,
    frozen: DvoraFrozen,
    B: Any,
    magnitude: Any,
    lambda_d: Any,
    lambda_b: Any,
    norm: Any,
    rows: Any,
    *,
    detach_norm: Any = False,
) -> DvoraRowsGrads:
    """Analytic gradients of ``y_i = (m / n)[rows[i]] * z_i`` over a mixed-adapter batch.

    The forward this inverts: the batch's ``k`` distinct DVoRA adapters have their norms
    ``n = dvora_norm_rows(frozen, B, lambda_d, lambda_b)`` (k, out); row ``i`` is scaled
    by its adapter's ``m / n`` (:func:`dvora_rows_output` of the gathered rows), or by
    one where ``rows[i]`` is ``-1`` (a VeRA adapter, or none). With
    ``Q_a = sum over the rows i of adapter a and their tokens of grad_y_i * z_i``:
    ``dL/dm_a = Q_a / n_a`` and, unless adapter ``a``'s norm is detached (DoRA section
    4.3), ``dL/dC_a = -(Q_a m_a / n_a^3)[:, None] * (W0 A_s^T + C_a A_s A_s^T)``, chained
    to the vectors through ``C_a = diag(lambda_b_a) B_s diag(lambda_d_a)``. Each adapter
    gets what :func:`dvora_backward` gives it on its own rows through the norm; the rest
    of its vector gradients comes from :func:`vera_core.vera_rows_backward` of the
    returned ``dL/dz``.

    Parameters
    ----------
    grad_y : array, shape (batch, ..., out)
        Upstream gradient of the scaled output (a bias added after scaling does not change it).
    z : array, shape (batch, ..., out)
        The unscaled output (``x W0^T`` plus each row's adapter term, no bias).
    frozen : DvoraFrozen
        The layer's frozen pieces (:func:`dvora_precompute`) for rank ``r``.
    B : array
        The shared B (max_out x R).
    magnitude, lambda_b, norm : array, shape (k, out)
        The batch's DVoRA adapters, one row each (``norm`` from :func:`dvora_norm_rows`).
    lambda_d : array, shape (k, r)
    rows : integer array, shape (batch,)
        Each batch row's adapter in ``[0, k)``, or ``-1``.
    detach_norm : bool or bool array of shape (k,)
        Treat the norm as a constant, for every adapter or per adapter.

    Returns
    -------
    DvoraRowsGrads
        ``z`` in the dtype of ``z``; the rest in the vectors' dtype.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections, linear, vera_rows_forward
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> W, x = xp.ones((6, 8)), xp.ones((3, 2, 8))
    >>> frozen, m = dvora_precompute(W, A, 4), initial_magnitude(W)[None, :]
    >>> d, b = xp.full((1, 4), 0.1), xp.full((1, 6), 0.5)
    >>> rows = xp.asarray([0, -1, 0])  # rows 0 and 2: the DVoRA adapter; row 1: scale one
    >>> z, u = vera_rows_forward(x, A, B, xp.concat([d, 0 * d, d]), xp.concat([b, 0 * b, b]), base=linear(x, W))
    >>> n = dvora_norm_rows(frozen, B, d, b)
    >>> g = dvora_rows_backward(xp.ones((3, 2, 6)), z, frozen, B, m, d, b, n, rows)
    >>> g.z.shape, g.magnitude.shape, g.lambda_d.shape
    ((3, 2, 6), (1, 6), (1, 4))
    """
    _require_structures(frozen)
    require_arrays(grad_y=grad_y, z=z, B=B, magnitude=magnitude, lambda_d=lambda_d, lambda_b=lambda_b, norm=norm)
    require_arrays(rows=rows)
    if not isinstance(detach_norm, bool):
        require_arrays(detach_norm=detach_norm)
    xp = namespace(grad_y, z, frozen.gram, B, magnitude, lambda_d, lambda_b, norm, rows)
    if z.ndim < 2:
        raise ValueError(f"z must have shape (batch, ..., out), got {tuple(z.shape)}")
    check_same_shape("grad_y", grad_y, tuple(z.shape), "z")
    check_ndim("lambda_d", lambda_d, 2, "(k, rank)")
    check_ndim("magnitude", magnitude, 2, "(k, out_features)")
    count, out_features = magnitude.shape[0], z.shape[-1]
    check_same_shape("magnitude", magnitude, (count, out_features), "(k, out_features of z)")
    for name, array in (("lambda_b", lambda_b), ("norm", norm)):
        check_same_shape(name, array, (count, out_features), "magnitude")
    if lambda_d.shape[0] != count or count == 0:
        raise ValueError(f"lambda_d has {lambda_d.shape[0]} rows and magnitude {count}; both hold the k >= 1 adapters")
    rank = lambda_d.shape[1]
    _check_frozen(frozen, out_features, rank)
    check_ndim("B", B, 2, "the shared matrix B (max_out x rank)")
    if out_features > B.shape[0] or rank > B.shape[1]:
        raise ValueError(f"the rows need B[:{out_features}, :{rank}] but the shared B has shape {tuple(B.shape)}")
    check_same_shape("rows", rows, (z.shape[0],), "(batch,) of z")
    if not xp.isdtype(rows.dtype, "integral"):
        raise TypeError(f"rows must have an integer dtype, got {rows.dtype}")
    check_real_float_dtype(xp, norm.dtype, "norm")
    for name, array in (("lambda_d", lambda_d), ("lambda_b", lambda_b)):
        if array.dtype != magnitude.dtype:
            raise TypeError(f"{name} has dtype {array.dtype} but magnitude has {magnitude.dtype}")
    check_real_float_dtype(xp, z.dtype, "z")
    check_vector_dtype(xp, magnitude.dtype, z.dtype)
    check_same_device({"z": z, "grad_y": grad_y, "magnitude": magnitude, "rows": rows, "B": B})
    detach_all = isinstance(detach_norm, bool) and detach_norm
    if not isinstance(detach_norm, bool):
        check_same_shape("detach_norm", detach_norm, (count,), "(k,): one flag per adapter")

    vec = magnitude.dtype
    norm = lr.cast(xp, norm, vec)
    per_row = (z.shape[0],) + (1,) * (z.ndim - 2) + (out_features,)
    m_rows, n_rows = take_rows(magnitude, rows, fill=1.0), take_rows(norm, rows, fill=1.0)
    scale = lr.cast(xp, xp.reshape(m_rows / n_rows, per_row), grad_y.dtype)
    token_axes = tuple(range(1, z.ndim - 1))
    product = grad_y * z
    q_rows = xp.sum(product, axis=token_axes, dtype=vec) if token_axes else lr.cast(xp, product, vec)
    grad_m = segment_sum(q_rows, rows, count) / norm
    B_s = B[:out_features, :rank]
    if detach_all:
        zero_d, zero_b = xp.zeros_like(lambda_d), xp.zeros_like(lambda_b)
        return DvoraRowsGrads(grad_y * scale, grad_m, zero_d, zero_b)
    coefficient = grad_m * (magnitude / norm) / norm  # Q m / n^3
    if not isinstance(detach_norm, bool):
        coefficient = xp.where(detach_norm[:, None], xp.zeros_like(coefficient), coefficient)
    work = frozen.gram.dtype
    C = lr.fold_rows(xp, B_s, lr.cast(xp, lambda_d, work), lr.cast(xp, lambda_b, work))
    direction = lr.cast(xp, frozen.weight_proj[None, :, :] + C @ frozen.gram, vec)
    grad_C = -coefficient[:, :, None] * direction
    grad_d, grad_b = lr.vector_grads_rows(xp, grad_C, B_s, lambda_d, lambda_b)
    return DvoraRowsGrads(grad_y * scale, grad_m, grad_d, grad_b)


def dvora_backward(
    grad_y: Any,
    saved: DvoraSaved,
    frozen: DvoraFrozen,
    A: Any,
    B: Any,
    magnitude: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    in_features: int,
    detach_norm: bool = False,
    has_bias: bool = False,
    dropout_mask: Any = None,
    input_grad: bool = True,
    base_grad: bool = True,
    check: bool = True,
) -> DvoraGrads:
    """Analytic DVoRA gradients, exact or with the norm treated as a constant.

    With ``s = m / n``, ``q_i = sum_t grad_y_ti z_ti`` and ``G = diag(s) grad_y^T u``:
    ``dL/dm = q / n``; ``dL/dC = G - (q m / n^3)[:, None] * (W0 A_s^T + C A_s A_s^T)``
    (the second term only when ``detach_norm`` is False, DoRA section 4.3), chained to
    the vectors through ``C = diag(lambda_b) B_s diag(lambda_d)``.

    Parameters
    ----------
    grad_y : array, shape (..., out)
        Upstream gradient.
    saved : DvoraSaved
        From :func:`dvora_forward`.
    frozen, A, B, magnitude, lambda_d, lambda_b
        As in :func:`dvora_forward`.
    in_features : int
        The layer's input features.
    detach_norm : bool
        Treat ``n`` as a constant (no gradient through the norm).
    has_bias : bool
        Also return ``dL/dbias``.
    dropout_mask : array, optional
        The forward's mask.
    input_grad : bool
        Compute the adapter path's ``dL/dx``.
    base_grad : bool
        Compute ``dL/dbase`` (tokens x out); False returns ``base=None``.
    check : bool
        Validate the arguments (default). An autograd Function that passes back exactly
        what its checked forward returned, and a gradient the framework has matched to
        the output, may skip it (per-step host time).

    Returns
    -------
    DvoraGrads

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections, linear
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> W, x = xp.ones((6, 8)), xp.ones((3, 8))
    >>> frozen, m = dvora_precompute(W, A, 4), initial_magnitude(W)
    >>> d, b = xp.full(4, 0.1), xp.zeros(6)
    >>> y, saved = dvora_forward(x, linear(x, W), frozen, A, B, m, d, b)
    >>> g = dvora_backward(xp.ones((3, 6)), saved, frozen, A, B, m, d, b, in_features=8)
    >>> g.magnitude.shape, g.lambda_b.shape, g.base.shape
    ((6,), (6,), (3, 6))
    """
    if check is True:
        require_flags(input_grad=input_grad, base_grad=base_grad)
    xp, A_s, C, grads, scale = _shared_backward(
        grad_y,
        saved,
        frozen,
        A,
        B,
        magnitude,
        lambda_d,
        lambda_b,
        in_features,
        check=check,
        detach_norm=detach_norm,
        has_bias=has_bias,
        dropout_mask=dropout_mask,
    )
    grad_z = grad_y * lr.cast(xp, scale, grad_y.dtype) if input_grad or base_grad else None
    grad_x = lr.input_grad(xp, grad_z, C, A_s, dropout_mask) if input_grad else None
    return grads._replace(x=grad_x, base=grad_z if base_grad else None)


def _shared_backward(
    grad_y: Any,
    saved: DvoraSaved,
    frozen: DvoraFrozen,
    A: Any,
    B: Any,
    magnitude: Any,
    lambda_d: Any,
    lambda_b: Any,
    in_features: int,
    *,
    check: bool,
    detach_norm: bool,
    has_bias: bool,
    dropout_mask: Any = None,
    weight: Any = None,
    fan_in_fan_out: bool = False,
) -> tuple[Any, Any, Any, DvoraGrads, Any]:
    """What both DVoRA backward passes share: ``(xp, A_s, C, grads, s)``.

    The arguments are checked unless ``check`` is False (against ``weight`` when given);
    ``grads`` holds the gradients of ``m``, the vectors and the bias (``x`` and ``base``
    None) and ``s = m / n``.
    """
    require_flags(check=check)
    if check:
        _require_structures(frozen, saved)
        require_arrays(grad_y=grad_y, A=A, B=B, magnitude=magnitude, lambda_d=lambda_d, lambda_b=lambda_b)
        optional_arrays(dropout_mask=dropout_mask, weight=weight)
        require_flags(detach_norm=detach_norm, has_bias=has_bias, fan_in_fan_out=fan_in_fan_out)
    u, z, norm = saved
    xp, shape = lr.backward_arguments(
        grad_y,
        u,
        A,
        B,
        lambda_d,
        lambda_b,
        in_features,
        check=check,
        u_name="saved.u",
        extra={"saved.z": z, "magnitude": magnitude, "dropout_mask": dropout_mask},
        weight=weight,
        fan_in_fan_out=fan_in_fan_out,
    )
    if check:
        check_same_shape("saved.z", z, tuple(grad_y.shape), "grad_y")
        check_same_shape("saved.norm", norm, (shape.out_features,), "lambda_b")
        _check_magnitude(magnitude, lambda_d, shape.out_features)
        _check_frozen(frozen, shape.out_features, shape.rank)
    A_s, B_s = lr.layer_slices(A, B, shape)
    C = lr.fold(xp, B_s, lambda_d, lambda_b)
    grads, scale = _vector_grads(
        xp, grad_y, saved, frozen, B_s, C, magnitude, lambda_d, lambda_b, detach_norm=detach_norm, has_bias=has_bias
    )
    return xp, A_s, C, grads, scale


def _vector_grads(
    xp: Any,
    grad_y: Any,
    saved: DvoraSaved,
    frozen: DvoraFrozen,
    B_s: Any,
    C: Any,
    magnitude: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    detach_norm: bool,
    has_bias: bool,
) -> tuple[DvoraGrads, Any]:
    """The gradients of ``m``, the vectors and the bias (``x`` and ``base`` None), and ``s = m / n``.

    ``magnitude`` and the vectors are vectors or one-row matrices (a bank's rows); their
    gradients, and ``s``, have their shapes.
    """
    u, z, norm = saved
    vec = lambda_d.dtype
    n = lr.cast(xp, norm, vec)
    scale = magnitude / n
    flat_g = lr.flatten_tokens(xp, grad_y)
    q = xp.sum(flat_g * lr.flatten_tokens(xp, z), axis=0, dtype=vec, keepdims=magnitude.ndim == 2)
    grad_m = q / n
    grad_C = lr.column(scale) * lr.token_gram(xp, grad_y, u, vec)
    if not detach_norm:
        # dL/dn_i / n_i = -q_i m_i / n_i^3 = -(grad_m * scale / n)_i, times dn^2/dC / 2
        direction = matmul_add(xp, frozen.weight_proj, lr.cast(xp, C, frozen.gram.dtype), frozen.gram)
        grad_C = sub_product(xp, grad_C, lr.column(grad_m * scale / n), lr.cast(xp, direction, vec))
    grad_d, grad_b = lr.vector_grads(xp, grad_C, B_s, lambda_d, lambda_b)
    grad_bias = xp.sum(flat_g, axis=0, dtype=vec) if has_bias else None
    return DvoraGrads(None, None, grad_m, grad_d, grad_b, grad_bias), scale


def dvora_merge(
    weight: Any,
    A: Any,
    B: Any,
    magnitude: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    fan_in_fan_out: bool = False,
    safe: bool = False,
) -> tuple[Any, Any]:
    """A new weight ``m * (W0 + dW) / n``, and ``n`` (keep it: :func:`dvora_unmerge` needs it).

    With ``safe=True`` the merge is refused (ValueError, nothing returned) unless the merged
    weight is finite and :func:`dvora_unmerge` recovers ``W0`` from it: a magnitude of zero,
    or so small that the merged rows lose their digits (``m = 1e-40`` in float32), cannot be
    undone.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> W = xp.ones((6, 8))
    >>> merged, norm = dvora_merge(W, A, B, initial_magnitude(W), xp.full(4, 0.1), xp.zeros(6))
    >>> bool(xp.all(xp.abs(merged - W) < 1e-6))
    True
    """
    require_arrays(magnitude=magnitude)
    require_flags(safe=safe)
    V, n, xp = _direction(weight, A, B, lambda_d, lambda_b, fan_in_fan_out)
    out_features, _ = lr.weight_shape(weight, fan_in_fan_out)
    _check_magnitude(magnitude, lambda_d, out_features)
    scale = lr.cast(xp, magnitude, V.dtype) / n
    merged = lr.cast(xp, V * (scale[None, :] if fan_in_fan_out else scale[:, None]), weight.dtype)
    if safe:
        check_finite(xp, "the merged weight", merged)
        _check_undoable(xp, weight, merged, n, A, B, magnitude, lambda_d, lambda_b, fan_in_fan_out)
    return merged, n


def _check_undoable(
    xp: Any,
    weight: Any,
    merged: Any,
    n: Any,
    A: Any,
    B: Any,
    magnitude: Any,
    lambda_d: Any,
    lambda_b: Any,
    fan_in_fan_out: bool,
) -> None:
    """Raise ValueError unless unmerging ``merged`` gives back ``weight`` to a few units of its precision."""
    if bool(xp.any(magnitude == 0)):
        raise ValueError("magnitude has zeros: those rows of the merged weight are zero and cannot be unmerged")
    recovered = dvora_unmerge(merged, n, A, B, magnitude, lambda_d, lambda_b, fan_in_fan_out=fan_in_fan_out)
    work = lr.wider(xp, weight.dtype)
    original = lr.cast(xp, weight, work)
    error = xp.sqrt(xp.sum((lr.cast(xp, recovered, work) - original) ** 2))
    size = xp.sqrt(xp.sum(original**2))
    tolerance = 8 * float(xp.finfo(weight.dtype).eps)
    if not bool(xp.isfinite(error)) or float(error) > tolerance * float(size):
        raise ValueError(
            "unmerging this weight would not recover W0 (magnitudes too small for the weight's precision); "
            "refusing a merge that cannot be undone (merge with safe=False to force)"
        )


def dvora_unmerge(
    weight: Any,
    norm: Any,
    A: Any,
    B: Any,
    magnitude: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    fan_in_fan_out: bool = False,
) -> Any:
    """Recover ``W0 = W' n / m - dW`` from a merged weight and the ``n`` merge returned.

    Raises ValueError when a magnitude is zero (that row's direction is lost).

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> W, d, b = xp.ones((6, 8)), xp.full(4, 0.1), xp.ones(6)
    >>> m = initial_magnitude(W)
    >>> merged, n = dvora_merge(W, A, B, m, d, b)
    >>> bool(xp.all(xp.abs(dvora_unmerge(merged, n, A, B, m, d, b) - W) < 1e-5))
    True
    """
    require_arrays(weight=weight, norm=norm, A=A, B=B, magnitude=magnitude, lambda_d=lambda_d, lambda_b=lambda_b)
    require_flags(fan_in_fan_out=fan_in_fan_out)
    xp, shape = lr.check_on_weight(A, B, lambda_d, lambda_b, weight, fan_in_fan_out, extra={"norm": norm})
    _check_magnitude(magnitude, lambda_d, shape.out_features)
    check_same_shape("norm", norm, (shape.out_features,), "lambda_b")
    if bool(xp.any(magnitude == 0)):
        raise ValueError("magnitude has zeros: those rows of the merged weight are zero and cannot be unmerged")
    A_s, B_s = lr.layer_slices(A, B, shape)
    work = lr.wider(xp, weight.dtype, lambda_d.dtype, norm.dtype)
    C = lr.cast(xp, lr.fold(xp, B_s, lambda_d, lambda_b), work)
    inverse = lr.cast(xp, norm, work) / lr.cast(xp, magnitude, work)
    inverse = inverse[None, :] if fan_in_fan_out else inverse[:, None]
    W0 = lr.cast(xp, weight, work) * inverse - lr.delta_weight_matrix(xp, C, A_s, fan_in_fan_out)
    return lr.cast(xp, W0, weight.dtype)


def check_dvora_whole_layer(
    x: Any,
    weight: Any,
    frozen: DvoraFrozen,
    A: Any,
    B: Any,
    magnitude: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    bias: Any = None,
    fan_in_fan_out: bool = False,
) -> tuple[Any, AdapterShape]:
    """The checks of :func:`dvora_forward_dense`: ``(namespace, layer sizes)``, or a specific exception.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> W = xp.ones((6, 8))
    >>> frozen, m = dvora_precompute(W, A, 4), initial_magnitude(W)
    >>> check_dvora_whole_layer(xp.ones((3, 8)), W, frozen, A, B, m, xp.full(4, 0.1), xp.ones(6))[1].rank
    4
    """
    require_arrays(magnitude=magnitude)
    _require_structures(frozen)
    xp, shape = _check_whole_layer(x, weight, A, B, lambda_d, lambda_b, bias, fan_in_fan_out, {"magnitude": magnitude})
    _check_dvora_layer(magnitude, lambda_d, frozen, bias, shape)
    return xp, shape


def dvora_forward_dense(
    x: Any,
    weight: Any,
    frozen: DvoraFrozen,
    A: Any,
    B: Any,
    magnitude: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    bias: Any = None,
    fan_in_fan_out: bool = False,
    merged: bool = True,
    check: bool = True,
) -> tuple[Any, DvoraSaved]:
    """:func:`dvora_forward` from the frozen weight: ``z = x (W0 + dW)^T``, through ``W'`` or factored.

    ``merged``: one product with ``W' = W0 + dW`` (cheaper for many tokens, see
    :func:`vera_core.merged_passes`), else ``x W0^T + u C^T``. Needs the frozen weight and
    no dropout (16-bit activations: see :func:`vera_core.vera_forward_dense`). Saves what
    :func:`dvora_forward` saves; use :func:`dvora_backward_dense`. ``check=False`` skips
    validation (see :func:`vera_core.vera_forward_dense`).

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections, linear
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> W, x = xp.ones((6, 8)), xp.ones((3, 8))
    >>> frozen, m = dvora_precompute(W, A, 4), initial_magnitude(W)
    >>> d, b = xp.full(4, 0.1), xp.ones(6)
    >>> y, _ = dvora_forward_dense(x, W, frozen, A, B, m, d, b)
    >>> reference, _ = dvora_forward(x, linear(x, W), frozen, A, B, m, d, b)
    >>> bool(xp.max(xp.abs(y - reference)) < 1e-12)
    True
    """
    require_flags(check=check)
    if check:
        require_flags(merged=merged)
        xp, shape = check_dvora_whole_layer(
            x, weight, frozen, A, B, magnitude, lambda_d, lambda_b, bias=bias, fan_in_fan_out=fan_in_fan_out
        )
    else:
        xp, shape = namespace(x), AdapterShape(lambda_d.shape[0], lambda_b.shape[0], x.shape[-1])
    A_s, B_s = lr.layer_slices(A, B, shape)
    C = lr.fold(xp, B_s, lambda_d, lambda_b)
    u = lr.project(xp, x, A_s, None)
    return _whole_forward(xp, x, u, weight, bias, frozen, A_s, C, magnitude, fan_in_fan_out, merged=merged)


def _whole_forward(
    xp: Any,
    x: Any,
    u: Any,
    weight: Any,
    bias: Any,
    frozen: DvoraFrozen,
    A_s: Any,
    C: Any,
    magnitude: Any,
    fan_in_fan_out: bool,
    *,
    merged: bool,
) -> tuple[Any, DvoraSaved]:
    """:func:`dvora_forward_dense` from checked, sliced arguments, ``u = x A_s^T`` and ``C`` (out x r).

    The unchecked internals; the vectors may be one-row matrices (a bank's rows).
    """
    norm = _gram_norm(xp, frozen, C)
    z = lr.whole_forward(xp, x, u, weight, None, A_s, C, fan_in_fan_out, merged=merged)
    return _scaled(xp, z, magnitude, norm, bias), DvoraSaved(u, z, norm)


def dvora_backward_dense(
    grad_y: Any,
    saved: DvoraSaved,
    frozen: DvoraFrozen,
    weight: Any,
    A: Any,
    B: Any,
    magnitude: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    fan_in_fan_out: bool = False,
    detach_norm: bool = False,
    has_bias: bool = False,
    input_grad: bool = True,
    merged: bool = True,
    check: bool = True,
) -> DvoraGrads:
    """Gradients of :func:`dvora_forward_dense`; ``x`` is the whole ``dL/dx`` and ``base`` is None.

    The vector gradients are :func:`dvora_backward`'s (they never need the weight);
    ``dL/dx = (grad_y * m / n) (W0 + dW)``, through ``W'`` (``merged``, the scale on its
    rows) or factored (the scale on ``grad_y``), independently of the forward's choice.
    ``check=False`` skips validation, as in :func:`dvora_backward`.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections, linear, linear_input_grad
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> W, x, g = xp.ones((6, 8)), xp.ones((3, 8)), xp.ones((3, 6))
    >>> frozen, m = dvora_precompute(W, A, 4), initial_magnitude(W)
    >>> d, b = xp.full(4, 0.1), xp.ones(6)
    >>> _, saved = dvora_forward_dense(x, W, frozen, A, B, m, d, b)
    >>> dense = dvora_backward_dense(g, saved, frozen, W, A, B, m, d, b)
    >>> factored = dvora_backward(g, saved, frozen, A, B, m, d, b, in_features=8)
    >>> whole = factored.x + linear_input_grad(factored.base, W)
    >>> bool(xp.max(xp.abs(dense.x - whole)) < 1e-12), dense.base is None
    (True, True)
    """
    if check is True:
        require_arrays(weight=weight)
        require_flags(fan_in_fan_out=fan_in_fan_out, input_grad=input_grad, merged=merged)
    xp, A_s, C, grads, scale = _shared_backward(
        grad_y,
        saved,
        frozen,
        A,
        B,
        magnitude,
        lambda_d,
        lambda_b,
        lr.weight_shape(weight, fan_in_fan_out)[1],
        check=check,
        detach_norm=detach_norm,
        has_bias=has_bias,
        weight=weight,
        fan_in_fan_out=fan_in_fan_out,
    )
    if not input_grad:
        return grads
    return grads._replace(x=_whole_input_grad(xp, grad_y, scale, weight, C, A_s, fan_in_fan_out, merged=merged))


def _whole_input_grad(
    xp: Any, grad_y: Any, scale: Any, weight: Any, C: Any, A_s: Any, fan_in_fan_out: bool, *, merged: bool
) -> Any:
    """``dL/dx = (grad_y * s) (W0 + C A_s)`` of the whole layer, ``s = m / n`` (unchecked internals).

    Through ``W'`` (``merged``: the scale on its rows, the smaller array there) or
    factored (the scale on ``grad_y``).
    """
    scale = lr.cast(xp, scale, grad_y.dtype)
    if not merged:
        return lr.whole_input_grad(xp, grad_y * scale, weight, C, A_s, fan_in_fan_out, merged=False)
    shifted = lr.shifted_weight(xp, weight, C, A_s, fan_in_fan_out, dtype=grad_y.dtype)
    scaled = shifted * (scale if fan_in_fan_out else lr.column(scale))  # the scale along the output axis
    return lr.weight_input_grad(xp, grad_y, scaled, fan_in_fan_out)
