"""VeRA: ``h = W0 x + lambda_b * (B (lambda_d * (A x)))``, functional and stateless.

Every function takes the *shared* matrices ``A`` (R x max_in) and ``B`` (max_out x R)
and slices what the layer needs: its rank ``r = len(lambda_d) <= R``, its output
features ``out = len(lambda_b) <= max_out`` and its input features ``in <= max_in``
(``A[:r, :in]``, ``B[:out, :r]``).

dtype policy: activations (``x``, ``base``, gradients) are any real floating dtype;
the vectors have the activations' dtype, or float32 beside float16/bfloat16
activations. Matrix products run in the activations' dtype; the vector gradients are
reduced in the vectors' dtype (float32 or wider). ``A`` is used in the activations'
dtype, ``B`` (only folded with the vectors) in the vectors'; ``B`` has ``A``'s dtype or
the vectors'.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from array_api_compat import device as device_of

from vera_core import _lowrank as lr
from vera_core._validation import (
    check_activations,
    check_adapter,
    check_finite,
    check_ndim,
    check_positive_int,
    check_same_shape,
    namespace,
    optional_arrays,
    require_arrays,
    require_flags,
)


class VeraGrads(NamedTuple):
    """Gradients of a VeRA layer's adapter term."""

    x: Any
    """``dL/dx`` through the adapter term only (None when not asked for); add the base layer's."""
    lambda_d: Any
    """``dL/dlambda_d``, shape (r,), in the vectors' dtype."""
    lambda_b: Any
    """``dL/dlambda_b``, shape (out,), in the vectors' dtype."""


def _check_mask(mask: Any, x_shape: tuple[int, ...]) -> None:
    if mask is not None:
        check_same_shape("dropout_mask", mask, x_shape, "x")


def vera_forward(
    x: Any,
    A: Any,
    B: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    base: Any = None,
    dropout_mask: Any = None,
) -> tuple[Any, Any]:
    """The VeRA output ``base + lambda_b * (B_s (lambda_d * (A_s (x * mask))))``.

    Parameters
    ----------
    x : array, shape (..., in)
        Layer input.
    A, B : array
        The shared projections, (R x max_in) and (max_out x R).
    lambda_d : array, shape (r,)
        Trainable scaling of the rank dimension.
    lambda_b : array, shape (out,)
        Trainable scaling of the output features.
    base : array, shape (..., out), optional
        The frozen layer's output ``W0 x + bias``; when omitted only the adapter term
        is returned.
    dropout_mask : array, shape (..., in), optional
        Multiplies ``x`` on the adapter path (zeros and ``1 / (1 - p)``).

    Returns
    -------
    y : array, shape (..., out)
        ``base`` plus the adapter term (or the adapter term alone).
    u : array, shape (..., r)
        ``(x * mask) A_s^T``: all that :func:`vera_backward` needs saved.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> x = xp.ones((2, 8))
    >>> y, u = vera_forward(x, A, B, xp.full(4, 0.1), xp.zeros(6))
    >>> y.shape, u.shape, bool(xp.all(y == 0))
    ((2, 6), (2, 4), True)
    """
    require_arrays(x=x, A=A, B=B, lambda_d=lambda_d, lambda_b=lambda_b)
    optional_arrays(base=base, dropout_mask=dropout_mask)
    xp, shape = check_adapter(
        A,
        B,
        lambda_d,
        lambda_b,
        x.shape[-1] if x.ndim else 0,
        activation_dtype=x.dtype,
        extra={"x": x, "base": base, "dropout_mask": dropout_mask},
    )
    check_activations("x", x, shape.in_features, "in_features on the last axis")
    _check_mask(dropout_mask, tuple(x.shape))
    if base is not None:
        check_same_shape("base", base, (*x.shape[:-1], shape.out_features), "x with out_features last")
        if base.dtype != x.dtype:
            raise TypeError(f"base has dtype {base.dtype} but x has {x.dtype}")
    A_s, B_s = lr.layer_slices(A, B, shape)
    u = lr.project(xp, x, A_s, dropout_mask)
    C = lr.cast(xp, lr.fold(xp, B_s, lambda_d, lambda_b), x.dtype)
    return (lr.product(xp, u, C) if base is None else lr.add_product(xp, base, u, C)), u


def vera_backward(
    grad_y: Any,
    u: Any,
    A: Any,
    B: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    in_features: int,
    dropout_mask: Any = None,
    input_grad: bool = True,
    check: bool = True,
) -> VeraGrads:
    """Analytic gradients of the VeRA adapter term, from ``u`` alone (no autograd).

    With ``C = diag(lambda_b) B_s diag(lambda_d)`` and ``G = grad_y^T u`` (summed over
    tokens): ``dL/dlambda_d = sum_i G_ik lambda_b_i B_ik``,
    ``dL/dlambda_b = sum_k G_ik lambda_d_k B_ik``, ``dL/dx = ((grad_y C) A_s) * mask``.

    Parameters
    ----------
    grad_y : array, shape (..., out)
        Upstream gradient of the layer output.
    u : array, shape (..., r)
        The ``u`` returned by :func:`vera_forward`.
    A, B, lambda_d, lambda_b : array
        As in :func:`vera_forward`.
    in_features : int
        The layer's input features.
    dropout_mask : array, shape (..., in), optional
        The mask used in the forward pass.
    input_grad : bool
        Compute ``dL/dx`` (two extra matrix products); False returns ``x=None``.
    check : bool
        Validate the arguments (default). An autograd Function that passes back exactly
        what its checked forward returned, and a gradient the framework has matched to
        the output, may skip it (per-step host time).

    Returns
    -------
    VeraGrads

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> d, b = xp.full(4, 0.1), xp.ones(6)
    >>> y, u = vera_forward(xp.ones((2, 8)), A, B, d, b)
    >>> g = vera_backward(xp.ones((2, 6)), u, A, B, d, b, in_features=8)
    >>> g.x.shape, g.lambda_d.shape, g.lambda_b.shape
    ((2, 8), (4,), (6,))
    """
    require_flags(check=check)
    if check:
        require_arrays(grad_y=grad_y, u=u, A=A, B=B, lambda_d=lambda_d, lambda_b=lambda_b)
        optional_arrays(dropout_mask=dropout_mask)
        require_flags(input_grad=input_grad)
    xp, shape = lr.backward_arguments(
        grad_y, u, A, B, lambda_d, lambda_b, in_features, check=check, extra={"dropout_mask": dropout_mask}
    )
    if check:
        _check_mask(dropout_mask, (*grad_y.shape[:-1], in_features))
    A_s, B_s = lr.layer_slices(A, B, shape)
    C = lr.fold(xp, B_s, lambda_d, lambda_b)
    grad_C = lr.token_gram(xp, grad_y, u, lambda_d.dtype)
    grad_d, grad_b = lr.vector_grads(xp, grad_C, B_s, lambda_d, lambda_b)
    grad_x = lr.input_grad(xp, grad_y, C, A_s, dropout_mask) if input_grad else None
    return VeraGrads(grad_x, grad_d, grad_b)


def delta_weight(
    A: Any,
    B: Any,
    lambda_d: Any,
    lambda_b: Any,
    in_features: int,
    *,
    fan_in_fan_out: bool = False,
) -> Any:
    """``delta W = diag(lambda_b) B_s diag(lambda_d) A_s``, in the vectors' dtype.

    Returns shape (out, in), or (in, out) with ``fan_in_fan_out``.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> delta_weight(A, B, xp.full(4, 0.1), xp.ones(6), 5).shape
    (6, 5)
    """
    require_arrays(A=A, B=B, lambda_d=lambda_d, lambda_b=lambda_b)
    require_flags(fan_in_fan_out=fan_in_fan_out)
    check_positive_int("in_features", in_features)
    xp, shape = check_adapter(A, B, lambda_d, lambda_b, in_features)
    A_s, B_s = lr.layer_slices(A, B, shape)
    return lr.delta_weight_matrix(xp, lr.fold(xp, B_s, lambda_d, lambda_b), A_s, fan_in_fan_out)


def _shift_weight(
    weight: Any, A: Any, B: Any, lambda_d: Any, lambda_b: Any, subtract: bool, fan_in_fan_out: bool, safe: bool
) -> Any:
    require_arrays(weight=weight, A=A, B=B, lambda_d=lambda_d, lambda_b=lambda_b)
    require_flags(fan_in_fan_out=fan_in_fan_out, safe=safe)
    xp, shape = lr.check_on_weight(A, B, lambda_d, lambda_b, weight, fan_in_fan_out)
    A_s, B_s = lr.layer_slices(A, B, shape)
    C = lr.fold(xp, B_s, lambda_d, lambda_b)
    shifted = lr.shifted_weight(xp, weight, C, A_s, fan_in_fan_out, subtract=subtract)
    result = lr.cast(xp, shifted, weight.dtype)
    if safe:
        check_finite(xp, "the merged weight", result)
    return result


def merge(
    weight: Any,
    A: Any,
    B: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    fan_in_fan_out: bool = False,
    safe: bool = False,
) -> Any:
    """A new weight ``W0 + delta W`` (the input is not modified).

    The sum is formed in float32 or wider and rounded once to the weight's dtype.

    Parameters
    ----------
    weight : array
        Stored (out, in), or (in, out) with ``fan_in_fan_out``.
    A, B, lambda_d, lambda_b : array
        As in :func:`vera_forward`.
    fan_in_fan_out : bool
        The weight is stored transposed (transformers' ``Conv1D``).
    safe : bool
        Raise ValueError, returning nothing, when the result holds NaN or infinity.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> W = xp.zeros((6, 8))
    >>> merge(W, A, B, xp.full(4, 0.1), xp.zeros(6)).shape
    (6, 8)
    """
    return _shift_weight(weight, A, B, lambda_d, lambda_b, False, fan_in_fan_out, safe)


def unmerge(
    weight: Any,
    A: Any,
    B: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    fan_in_fan_out: bool = False,
) -> Any:
    """A new weight ``W - delta W``: undoes :func:`merge` up to rounding.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> d, b = xp.full(4, 0.1), xp.ones(6)
    >>> W = xp.zeros((6, 8), dtype=xp.float64)
    >>> back = unmerge(merge(W, A, B, d, b), A, B, d, b)
    >>> float(xp.max(xp.abs(back))) < 1e-6
    True
    """
    return _shift_weight(weight, A, B, lambda_d, lambda_b, True, fan_in_fan_out, False)


DENSE_MIN_SAVING = 1 << 20
"""Multiply-adds a merged pass must save to be taken: it costs a weight-sized temporary, and
below this the fixed costs of a step (its operators, the host's time) decide, not the work."""


class MergedPasses(NamedTuple):
    """Which passes of a layer with its frozen weight at hand go through ``W' = W0 + C A_s``."""

    forward: bool
    """``x W'^T`` instead of ``x W0^T + u C^T``."""
    backward: bool
    """``dL/dx = grad_y W'`` instead of ``grad_y W0 + (grad_y C) A_s``."""


def merged_passes(tokens: int, in_features: int, out_features: int, rank: int) -> MergedPasses:
    """Choose, per pass, between the factored form and the merged weight ``W' = W0 + C A_s``.

    Both forms compute ``u = x A_s^T`` (and, in backward, ``grad_y^T u``); they differ in
    the rest. Forward: ``u C^T`` costs ``T r out`` multiply-adds where ``W'`` costs ``out r
    in`` (the product with ``W'`` replaces the frozen layer's own). Backward: ``(grad_y C)
    A_s`` costs ``T r (in + out)`` beside ``grad_y W0`` where ``grad_y W'`` costs ``out r
    in``. Each pass is merged when that saves :data:`DENSE_MIN_SAVING` multiply-adds, so
    many tokens merge both, a middling number only the backward, few tokens neither.

    Parameters
    ----------
    tokens : int
        Rows of the activations (every leading axis).
    in_features, out_features, rank : int
        The layer.

    Returns
    -------
    MergedPasses

    Examples
    --------
    >>> merged_passes(2048, 1024, 1024, 256)
    MergedPasses(forward=True, backward=True)
    >>> merged_passes(16, 1024, 1024, 256)
    MergedPasses(forward=False, backward=False)
    >>> merged_passes(768, 1024, 1024, 256)
    MergedPasses(forward=False, backward=True)
    """
    check_positive_int("in_features", in_features)
    check_positive_int("out_features", out_features)
    check_positive_int("rank", rank)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise ValueError(f"tokens must be a non-negative int, got {tokens!r}")
    merge_cost = out_features * rank * in_features
    forward = tokens * rank * out_features - merge_cost >= DENSE_MIN_SAVING
    backward = tokens * rank * (in_features + out_features) - merge_cost >= DENSE_MIN_SAVING
    return MergedPasses(forward, backward)


def check_whole_layer(
    x: Any,
    weight: Any,
    A: Any,
    B: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    bias: Any = None,
    fan_in_fan_out: bool = False,
) -> tuple[Any, lr.AdapterShape]:
    """The checks of :func:`vera_forward_dense`: ``(namespace, layer sizes)``, or a specific exception.

    For a framework's own node of the whole layer that checks its arguments once and then
    calls the unchecked internals.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> check_whole_layer(xp.ones((3, 8)), xp.ones((6, 8)), A, B, xp.full(4, 0.1), xp.ones(6))[1]
    AdapterShape(rank=4, out_features=6, in_features=8)
    """
    return _check_whole_layer(x, weight, A, B, lambda_d, lambda_b, bias, fan_in_fan_out, {})


def _check_whole_layer(
    x: Any,
    weight: Any,
    A: Any,
    B: Any,
    lambda_d: Any,
    lambda_b: Any,
    bias: Any,
    fan_in_fan_out: bool,
    extra: dict[str, Any],
) -> tuple[Any, lr.AdapterShape]:
    """:func:`check_whole_layer`, with ``extra`` arrays checked for namespace and device alongside."""
    require_arrays(x=x, weight=weight, A=A, B=B, lambda_d=lambda_d, lambda_b=lambda_b)
    optional_arrays(bias=bias)
    require_flags(fan_in_fan_out=fan_in_fan_out)
    xp, shape = lr.check_on_weight(
        A,
        B,
        lambda_d,
        lambda_b,
        weight,
        fan_in_fan_out,
        activation_dtype=x.dtype,
        extra={"x": x, "bias": bias, **extra},
    )
    check_activations("x", x, shape.in_features, "in_features on the last axis")
    if bias is not None:
        check_same_shape("bias", bias, (shape.out_features,), "(out_features,)")
    return xp, shape


def vera_forward_dense(
    x: Any,
    weight: Any,
    A: Any,
    B: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    bias: Any = None,
    fan_in_fan_out: bool = False,
    merged: bool = True,
    check: bool = True,
) -> tuple[Any, Any]:
    """The whole adapted layer ``x (W0 + delta W)^T + bias``, from the frozen weight.

    Equal to ``vera_forward(x, ..., base=linear(x, W0, bias))`` up to rounding. With
    ``merged`` it forms ``W' = W0 + C A_s`` and needs one product with it (cheaper for
    many tokens, see :func:`merged_passes`), else it adds ``u C^T`` to ``x W0^T``. Needs
    the frozen weight (not for quantised bases) and no dropout (the base path would see
    the dropped input). With 16-bit activations ``W'`` is rounded to their dtype once (see
    ``docs/concepts.md``): as accurate as the factored form, whose output is rounded too.

    Parameters
    ----------
    x : array, shape (..., in)
    weight : array
        The frozen weight, (out, in) or (in, out) with ``fan_in_fan_out``.
    A, B, lambda_d, lambda_b : array
        As in :func:`vera_forward`.
    bias : array, shape (out,), optional
    fan_in_fan_out : bool
        The weight is stored transposed.
    merged : bool
        Go through ``W'`` (default) or the factored form.
    check : bool
        Validate the arguments (default). A caller that checked them once and holds them
        unchanged (an autograd Function's hot path) may skip it.

    Returns
    -------
    y : array, shape (..., out)
    u : array, shape (..., r)
        For :func:`vera_backward_dense`.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections, linear
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> W, x = xp.ones((6, 8)), xp.ones((3, 8))
    >>> d, b = xp.full(4, 0.1), xp.ones(6)
    >>> y, u = vera_forward_dense(x, W, A, B, d, b)
    >>> reference, _ = vera_forward(x, A, B, d, b, base=linear(x, W))
    >>> bool(xp.max(xp.abs(y - reference)) < 1e-12)
    True
    >>> factored, _ = vera_forward_dense(x, W, A, B, d, b, merged=False)
    >>> bool(xp.max(xp.abs(factored - reference)) < 1e-12)
    True
    """
    require_flags(check=check)
    if check:
        require_flags(merged=merged)
        xp, shape = check_whole_layer(x, weight, A, B, lambda_d, lambda_b, bias=bias, fan_in_fan_out=fan_in_fan_out)
    else:
        xp, shape = namespace(x), lr.AdapterShape(lambda_d.shape[0], lambda_b.shape[0], x.shape[-1])
    A_s, B_s = lr.layer_slices(A, B, shape)
    u = lr.project(xp, x, A_s, None)
    C = lr.fold(xp, B_s, lambda_d, lambda_b)
    return lr.whole_forward(xp, x, u, weight, bias, A_s, C, fan_in_fan_out, merged=merged), u


def vera_backward_dense(
    grad_y: Any,
    u: Any,
    weight: Any,
    A: Any,
    B: Any,
    lambda_d: Any,
    lambda_b: Any,
    *,
    fan_in_fan_out: bool = False,
    input_grad: bool = True,
    merged: bool = True,
    check: bool = True,
) -> VeraGrads:
    """Gradients of :func:`vera_forward_dense`; ``x`` is the *whole* ``dL/dx`` (base included).

    ``merged``: ``dL/dx = grad_y W'`` (default) or ``grad_y W0 + (grad_y C) A_s`` (see
    :func:`merged_passes`); the choice is independent of the forward's. ``check=False``
    skips validation, as in :func:`vera_backward`.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections, linear_input_grad
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> W, x, g = xp.ones((6, 8)), xp.ones((3, 8)), xp.ones((3, 6))
    >>> d, b = xp.full(4, 0.1), xp.ones(6)
    >>> y, u = vera_forward_dense(x, W, A, B, d, b)
    >>> dense = vera_backward_dense(g, u, W, A, B, d, b)
    >>> factored = vera_backward(g, u, A, B, d, b, in_features=8)
    >>> bool(xp.max(xp.abs(dense.x - (factored.x + linear_input_grad(g, W)))) < 1e-12)
    True
    >>> split = vera_backward_dense(g, u, W, A, B, d, b, merged=False)
    >>> bool(xp.max(xp.abs(split.x - dense.x)) < 1e-12)
    True
    """
    require_flags(check=check)
    if check:
        require_arrays(grad_y=grad_y, u=u, weight=weight, A=A, B=B, lambda_d=lambda_d, lambda_b=lambda_b)
        require_flags(fan_in_fan_out=fan_in_fan_out, input_grad=input_grad, merged=merged)
    in_features = lr.weight_shape(weight, fan_in_fan_out)[1]
    xp, shape = lr.backward_arguments(
        grad_y, u, A, B, lambda_d, lambda_b, in_features, check=check, weight=weight, fan_in_fan_out=fan_in_fan_out
    )
    A_s, B_s = lr.layer_slices(A, B, shape)
    grad_C = lr.token_gram(xp, grad_y, u, lambda_d.dtype)
    grad_d, grad_b = lr.vector_grads(xp, grad_C, B_s, lambda_d, lambda_b)
    grad_x = None
    if input_grad:
        C = lr.fold(xp, B_s, lambda_d, lambda_b)
        grad_x = lr.whole_input_grad(xp, grad_y, weight, C, A_s, fan_in_fan_out, merged=merged)
    return VeraGrads(grad_x, grad_d, grad_b)


def _first_row(rows: Any) -> Any:
    """Row 0 of a (batch, n) array, or zeros of length n for an empty batch (for the checks)."""
    if rows.shape[0]:
        return rows[0, :]
    return namespace(rows).zeros(rows.shape[1], dtype=rows.dtype, device=device_of(rows))


def _check_rows(name: str, x: Any, lambda_d_rows: Any, lambda_b_rows: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The row checks of the mixed-adapter functions (``x``: the input, or ``grad_y``); the arrays by name."""
    require_arrays(**{name: x, "lambda_d_rows": lambda_d_rows, "lambda_b_rows": lambda_b_rows})
    optional_arrays(**extra)
    if x.ndim < 2:
        last = "in" if name == "x" else "out"
        raise ValueError(f"{name} must have shape (batch, ..., {last}), got {tuple(x.shape)}")
    check_ndim("lambda_d_rows", lambda_d_rows, 2, "(batch, rank)")
    check_ndim("lambda_b_rows", lambda_b_rows, 2, "(batch, out_features)")
    batch = x.shape[0]
    for rows_name, rows in (("lambda_d_rows", lambda_d_rows), ("lambda_b_rows", lambda_b_rows)):
        if rows.shape[0] != batch:
            raise ValueError(f"{rows_name} has {rows.shape[0]} rows but {name} has a batch of {batch}")
    return {"lambda_d_rows": lambda_d_rows, "lambda_b_rows": lambda_b_rows, **extra}


def vera_rows_forward(
    x: Any,
    A: Any,
    B: Any,
    lambda_d_rows: Any,
    lambda_b_rows: Any,
    *,
    base: Any = None,
    dropout_mask: Any = None,
) -> tuple[Any, Any]:
    """The VeRA output with different vectors for each leading row (mixed-adapter batches).

    Row ``i`` of ``x`` (shape (batch, ..., in)) gets
    ``base_i + lambda_b_rows[i] * (B_s (lambda_d_rows[i] * (A_s (x_i * mask_i))))``. Rows
    of zeros select no adapter; adapters of smaller rank are served by zero-padding their
    ``lambda_d`` (exact). The cost does not depend on how many adapters the rows come
    from: one shared product with ``A``, then either the vectors on the activations or one
    folded matrix per row, whichever touches fewer numbers.

    Parameters
    ----------
    x : array, shape (batch, ..., in)
    A, B : array
        The shared projections.
    lambda_d_rows : array, shape (batch, r)
    lambda_b_rows : array, shape (batch, out)
    base : array, shape (batch, ..., out), optional
        The frozen layer's output; when given, ``base`` plus the adapter terms is
        returned (one fused pass).
    dropout_mask : array, shape (batch, ..., in), optional
        Multiplies ``x`` on the adapter path (zeros and ``1 / (1 - p)``, each row its own ``p``).

    Returns
    -------
    y : array, shape (batch, ..., out)
    u : array, shape (batch, ..., r)
        ``(x * mask) A_s^T``: what :func:`vera_rows_backward` needs saved.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> x = xp.ones((2, 3, 8))
    >>> d, b = xp.full((2, 4), 0.1), xp.stack([xp.zeros(6), xp.ones(6)])
    >>> y, u = vera_rows_forward(x, A, B, d, b)
    >>> single, _ = vera_forward(x[1], A, B, d[1], b[1])
    >>> y.shape, u.shape, bool(xp.all(y[0] == 0)), bool(xp.allclose(y[1], single))
    ((2, 3, 6), (2, 3, 4), True, True)
    """
    require_arrays(A=A, B=B)
    named = _check_rows("x", x, lambda_d_rows, lambda_b_rows, {"x": x, "base": base, "dropout_mask": dropout_mask})
    xp, shape = check_adapter(
        A,
        B,
        _first_row(lambda_d_rows),
        _first_row(lambda_b_rows),
        x.shape[-1],
        activation_dtype=x.dtype,
        extra=named,
    )
    check_activations("x", x, shape.in_features, "in_features on the last axis")
    _check_mask(dropout_mask, tuple(x.shape))
    if base is not None:
        check_same_shape("base", base, (*x.shape[:-1], shape.out_features), "x with out_features last")
        if base.dtype != x.dtype:
            raise TypeError(f"base has dtype {base.dtype} but x has {x.dtype}")
    A_s, B_s = lr.layer_slices(A, B, shape)
    u = lr.project(xp, x, A_s, dropout_mask)
    return lr.rows_delta(xp, u, B_s, lambda_d_rows, lambda_b_rows, base), u


def vera_delta_rows(x: Any, A: Any, B: Any, lambda_d_rows: Any, lambda_b_rows: Any, *, base: Any = None) -> Any:
    """:func:`vera_rows_forward`'s output alone (``base`` plus each row's adapter term, or the term).

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> x = xp.ones((2, 3, 8))
    >>> d, b = xp.full((2, 4), 0.1), xp.stack([xp.zeros(6), xp.ones(6)])
    >>> delta = vera_delta_rows(x, A, B, d, b)
    >>> single, _ = vera_forward(x[1], A, B, d[1], b[1])
    >>> delta.shape, bool(xp.all(delta[0] == 0)), bool(xp.allclose(delta[1], single))
    ((2, 3, 6), True, True)
    """
    return vera_rows_forward(x, A, B, lambda_d_rows, lambda_b_rows, base=base)[0]


def vera_rows_backward(
    grad_y: Any,
    u: Any,
    A: Any,
    B: Any,
    lambda_d_rows: Any,
    lambda_b_rows: Any,
    *,
    in_features: int,
    dropout_mask: Any = None,
    input_grad: bool = True,
    check: bool = True,
) -> VeraGrads:
    """Analytic gradients of :func:`vera_rows_forward`'s adapter terms, one row of gradients per batch row.

    Row ``i``'s gradients are :func:`vera_backward`'s for that row alone with its own
    vectors: ``dL/dlambda_d_rows[i]``, ``dL/dlambda_b_rows[i]`` and the row's ``dL/dx``.
    An adapter's gradient is the sum over the rows it served
    (:func:`vera_core.segments.segment_sum`); rows that used no adapter (zero vectors)
    get a ``lambda_b`` gradient too, which the caller drops. A zero-padded
    ``lambda_d`` gets a gradient in its padding, which the caller masks to keep the
    padding zero.

    Parameters
    ----------
    grad_y : array, shape (batch, ..., out)
        Upstream gradient of the output.
    u : array, shape (batch, ..., r)
        The ``u`` returned by :func:`vera_rows_forward`.
    A, B, lambda_d_rows, lambda_b_rows : array
        As in :func:`vera_rows_forward`.
    in_features : int
        The layer's input features.
    dropout_mask : array, shape (batch, ..., in), optional
        The mask used in the forward pass.
    input_grad : bool
        Compute ``dL/dx`` through the adapter terms; False returns ``x=None``.
    check : bool
        Validate the arguments (default); False takes them as a checked forward left them.

    Returns
    -------
    VeraGrads
        ``x`` (batch, ..., in) or None, ``lambda_d`` (batch, r), ``lambda_b`` (batch, out),
        the vector gradients in the vectors' dtype.

    Examples
    --------
    >>> import numpy as xp
    >>> from vera_core import generate_projections
    >>> A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=xp)
    >>> x, g = xp.ones((2, 3, 8)), xp.ones((2, 3, 6))
    >>> d, b = xp.full((2, 4), 0.1), xp.stack([xp.full(6, 0.5), xp.ones(6)])
    >>> _, u = vera_rows_forward(x, A, B, d, b)
    >>> rows = vera_rows_backward(g, u, A, B, d, b, in_features=8)
    >>> _, u1 = vera_forward(x[1], A, B, d[1], b[1])
    >>> alone = vera_backward(g[1], u1, A, B, d[1], b[1], in_features=8)
    >>> rows.lambda_d.shape, bool(xp.allclose(rows.lambda_b[1], alone.lambda_b))
    ((2, 4), True)
    """
    require_flags(input_grad=input_grad, check=check)
    if check:
        require_arrays(u=u, A=A, B=B)
        check_positive_int("in_features", in_features)
        named = _check_rows(
            "grad_y", grad_y, lambda_d_rows, lambda_b_rows, {"grad_y": grad_y, "u": u, "dropout_mask": dropout_mask}
        )
        xp, shape = check_adapter(
            A,
            B,
            _first_row(lambda_d_rows),
            _first_row(lambda_b_rows),
            in_features,
            activation_dtype=grad_y.dtype,
            extra=named,
        )
        check_activations("grad_y", grad_y, shape.out_features, "out_features on the last axis")
        check_same_shape("u", u, (*grad_y.shape[:-1], shape.rank), "grad_y with rank last")
        _check_mask(dropout_mask, (*grad_y.shape[:-1], in_features))
    else:
        xp = namespace(grad_y)
        shape = lr.AdapterShape(lambda_d_rows.shape[1], lambda_b_rows.shape[1], in_features)
    A_s, B_s = lr.layer_slices(A, B, shape)
    grad_d, grad_b, grad_u = lr.rows_delta_backward(xp, grad_y, u, B_s, lambda_d_rows, lambda_b_rows, grad_u=input_grad)
    grad_x = lr.project_back(xp, grad_u, A_s, dropout_mask) if input_grad else None
    return VeraGrads(grad_x, grad_d, grad_b)
