"""Pieces shared by VeRA and DVoRA: layer slices, the folded matrix, vector gradients.

Everything is written in terms of the folded matrix ``C = diag(lambda_b) B_s diag(lambda_d)``
(out x r), so that ``delta W = C A_s`` and the adapter output is ``(x A_s^T) C^T``: the
vectors are applied to the small matrix instead of to the (tokens x out) activations.
"""

from __future__ import annotations

from typing import Any

from vera_core import _fused
from vera_core._validation import (
    AdapterShape,
    check_activations,
    check_adapter,
    check_positive_int,
    check_same_shape,
    is_half,
    namespace,
)


def layer_slices(A: Any, B: Any, shape: AdapterShape) -> tuple[Any, Any]:
    """``A[:r, :in]`` and ``B[:out, :r]``: the parts of the shared matrices one layer uses.

    A matrix the layer uses whole is returned as it is (no slicing view to create).
    """
    rank, n_in, n_out = shape.rank, shape.in_features, shape.out_features
    A_s = A if tuple(A.shape) == (rank, n_in) else A[:rank, :n_in]
    B_s = B if tuple(B.shape) == (n_out, rank) else B[:n_out, :rank]
    return A_s, B_s


def cast(xp: Any, array: Any, dtype: Any) -> Any:
    """``array`` as ``dtype``, without a copy when it already is."""
    return array if array.dtype == dtype else xp.astype(array, dtype)


def column(vector: Any) -> Any:
    """A vector (n,), or a one-row matrix (1, n) (a bank's row), as an (n, 1) column (a view)."""
    return vector[:, None] if vector.ndim == 1 else vector.T


def fold(xp: Any, B_s: Any, lambda_d: Any, lambda_b: Any) -> Any:
    """``C = diag(lambda_b) B_s diag(lambda_d)`` (out x r), in the vectors' dtype (vectors or one-row matrices)."""
    return column(lambda_b) * cast(xp, B_s, lambda_d.dtype) * lambda_d


def fold_row_t(xp: Any, B_s_t: Any, lambda_d_row: Any, lambda_b_row: Any) -> Any:
    """``C^T`` (r x out) from ``B_s^T`` and one bank row of each vector, (1, r) and (1, out).

    The transpose of :func:`fold` of the flattened vectors, without flattening them (an
    adapter bank holds its vectors as rows): ``C^T = diag(lambda_d) B_s^T diag(lambda_b)``.
    """
    return lambda_d_row.T * cast(xp, B_s_t, lambda_d_row.dtype) * lambda_b_row


def fold_rows(xp: Any, B_s: Any, lambda_d_rows: Any, lambda_b_rows: Any) -> Any:
    """``C`` of every row: (n, out, r) from ``lambda_d_rows`` (n, r) and ``lambda_b_rows`` (n, out)."""
    B_w = cast(xp, B_s, lambda_d_rows.dtype)
    return lambda_b_rows[:, :, None] * B_w[None, :, :] * lambda_d_rows[:, None, :]


def rows_delta(xp: Any, u: Any, B_s: Any, lambda_d_rows: Any, lambda_b_rows: Any, base: Any = None) -> Any:
    """Each leading row's adapter term, added to ``base`` when given; ``u`` is (batch, ..., r).

    Row ``i`` gets ``lambda_b_rows[i] * ((u_i * lambda_d_rows[i]) B_s^T)``. Whichever of two
    equal forms touches fewer numbers is used: per-row folded matrices ``C_i`` (batch x out
    x r, one batched product, whose epilogue adds ``base``) when the rows hold more tokens
    than the rank, else the vectors on the activations (one fused multiply-add over
    ``base``). The vectors are cast to the dtype of ``u`` first.
    """
    batch, rank = u.shape[0], u.shape[-1]
    out_features = lambda_b_rows.shape[-1]
    d_rows, b_rows = cast(xp, lambda_d_rows, u.dtype), cast(xp, lambda_b_rows, u.dtype)
    shape = (*u.shape[:-1], out_features)
    tokens_per_row = 1
    for size in u.shape[1:-1]:
        tokens_per_row *= size
    if tokens_per_row > rank:
        C_t = xp.permute_dims(fold_rows(xp, B_s, d_rows, b_rows), (0, 2, 1))  # (batch, r, out)
        u3 = xp.reshape(u, (batch, tokens_per_row, rank))
        if base is None:
            return xp.reshape(u3 @ C_t, shape)
        base3 = xp.reshape(base, (batch, tokens_per_row, out_features))
        return xp.reshape(_fused.batch_matmul_add(xp, base3, u3, C_t), shape)
    per_row = (batch,) + (1,) * (u.ndim - 2)
    product = (u * xp.reshape(d_rows, (*per_row, rank))) @ cast(xp, B_s, u.dtype).T
    b_rows = xp.reshape(b_rows, (*per_row, out_features))
    return product * b_rows if base is None else _fused.add_product(xp, base, product, b_rows)


def rows_delta_backward(
    xp: Any, grad_y: Any, u: Any, B_s: Any, lambda_d_rows: Any, lambda_b_rows: Any, *, grad_u: bool
) -> tuple[Any, Any, Any]:
    """Gradients of :func:`rows_delta`'s adapter term: ``(dL/dlambda_d_rows, dL/dlambda_b_rows, dL/du)``.

    Per leading row ``i`` (its tokens ``t``), with ``P = (u_i * d_i) B_s^T`` and
    ``H = (grad_y_i * b_i) B_s``: ``dL/db_i = sum_t grad_y_i * P``, ``dL/dd_i = sum_t u_i * H``,
    ``dL/du_i = H * d_i``. Rows holding more tokens than the rank take the equal folded
    form instead (``G_i = grad_y_i^T u_i``, then :func:`vector_grads_rows`; ``dL/du_i =
    grad_y_i C_i``), as :func:`rows_delta` does. The vector gradients are summed in the
    vectors' dtype; ``dL/du`` (None unless ``grad_u``) is in the dtype of ``grad_y``.
    """
    batch, rank = u.shape[0], u.shape[-1]
    out_features = lambda_b_rows.shape[-1]
    vec = lambda_d_rows.dtype
    d_rows, b_rows = cast(xp, lambda_d_rows, u.dtype), cast(xp, lambda_b_rows, u.dtype)
    tokens_per_row = 1
    for size in u.shape[1:-1]:
        tokens_per_row *= size
    if tokens_per_row > rank:
        u3 = xp.reshape(u, (batch, tokens_per_row, rank))
        g3 = xp.reshape(grad_y, (batch, tokens_per_row, out_features))
        gram = cast(xp, xp.permute_dims(g3, (0, 2, 1)) @ u3, vec)  # (batch, out, r)
        grad_d, grad_b = vector_grads_rows(xp, gram, B_s, lambda_d_rows, lambda_b_rows)
        if not grad_u:
            return grad_d, grad_b, None
        C_rows = fold_rows(xp, B_s, d_rows, b_rows)  # (batch, out, r) in the activations' dtype
        return grad_d, grad_b, xp.reshape(g3 @ C_rows, u.shape)
    per_row = (batch,) + (1,) * (u.ndim - 2)
    token_axes = tuple(range(1, u.ndim - 1))
    B_w = cast(xp, B_s, u.dtype)
    d_b = xp.reshape(d_rows, (*per_row, rank))
    product = (u * d_b) @ B_w.T
    grad_b = xp.sum(grad_y * product, axis=token_axes, dtype=vec) if token_axes else cast(xp, grad_y * product, vec)
    H = (grad_y * xp.reshape(b_rows, (*per_row, out_features))) @ B_w
    grad_d = xp.sum(u * H, axis=token_axes, dtype=vec) if token_axes else cast(xp, u * H, vec)
    return grad_d, grad_b, (H * d_b if grad_u else None)


def vector_grads_rows(xp: Any, grad_C_rows: Any, B_s: Any, lambda_d_rows: Any, lambda_b_rows: Any) -> tuple[Any, Any]:
    """:func:`vector_grads` of a stack: ``dL/dC`` (n, out, r) to ``(dL/dlambda_d_rows, dL/dlambda_b_rows)``."""
    weighted = grad_C_rows * cast(xp, B_s, grad_C_rows.dtype)[None, :, :]
    grad_d = (lambda_b_rows[:, None, :] @ weighted)[:, 0, :]
    grad_b = (weighted @ lambda_d_rows[:, :, None])[:, :, 0]
    return grad_d, grad_b


def project_t(xp: Any, x: Any, A_s_t: Any) -> Any:
    """``u = x A_s^T`` from ``A_s^T`` (in x r) in the dtype of ``x`` (the operator: no wrapper on the hot path)."""
    return x @ cast(xp, A_s_t, x.dtype)


def project(xp: Any, x: Any, A_s: Any, dropout_mask: Any) -> Any:
    """``u = (x * mask) A_s^T`` (..., r) in the dtype of ``x``."""
    if dropout_mask is not None:
        x = x * dropout_mask
    return _fused.linear(xp, x, cast(xp, A_s, x.dtype), None)


def product(xp: Any, u: Any, C: Any) -> Any:
    """``u C^T`` over the leading dimensions, as :func:`add_product` forms it (tokens flattened):
    the adapter term alone rounds exactly as it does added to a base."""
    C_t = cast(xp, C, u.dtype).T
    if u.ndim == 2:
        return u @ C_t
    return xp.reshape(flatten_tokens(xp, u) @ C_t, (*u.shape[:-1], C_t.shape[1]))


def add_product(xp: Any, base: Any, u: Any, C: Any) -> Any:
    """``base + u C^T`` over the leading dimensions, ``C`` cast to the dtype of ``u`` (one fused product)."""
    return add_product_t(xp, base, u, cast(xp, C, u.dtype).T)


def add_product_t(xp: Any, base: Any, u: Any, C_t: Any) -> Any:
    """``base + u C_t`` over the leading dimensions, ``C_t`` cast to the dtype of ``u`` (one fused product)."""
    C_t = cast(xp, C_t, u.dtype)
    if base.ndim == 2:
        return _fused.matmul_add(xp, base, u, C_t)
    return xp.reshape(_fused.matmul_add(xp, flatten_tokens(xp, base), flatten_tokens(xp, u), C_t), base.shape)


def flatten_tokens(xp: Any, array: Any) -> Any:
    """Collapse the leading dimensions: (..., f) -> (tokens, f)."""
    return array if array.ndim == 2 else xp.reshape(array, (-1, array.shape[-1]))


def token_gram(xp: Any, grad: Any, u: Any, dtype: Any) -> Any:
    """``grad^T u`` summed over every token (out x r), returned in ``dtype``."""
    total = flatten_tokens(xp, grad).T @ flatten_tokens(xp, u)
    return cast(xp, total, dtype)


def vector_grads(xp: Any, grad_C: Any, B_s: Any, lambda_d: Any, lambda_b: Any) -> tuple[Any, Any]:
    """Chain ``dL/dC`` to ``(dL/dlambda_d, dL/dlambda_b)`` through ``C = diag(b) B diag(d)``.

    The vectors are (r,) and (out,), or one-row matrices (1, r) and (1, out) (a bank's
    row); the gradients have their shapes.
    """
    weighted = grad_C * cast(xp, B_s, grad_C.dtype)
    if lambda_d.ndim == 1:  # matrix-vector products
        return weighted.T @ lambda_b, weighted @ lambda_d
    return lambda_b @ weighted, lambda_d @ weighted.T


def input_grad(xp: Any, grad: Any, C: Any, A_s: Any, dropout_mask: Any) -> Any:
    """``dL/dx`` of the adapter term: ``((grad C) A_s) * mask``."""
    return project_back(xp, grad @ cast(xp, C, grad.dtype), A_s, dropout_mask)


def project_back(xp: Any, grad_u: Any, A_s: Any, dropout_mask: Any) -> Any:
    """``dL/dx`` through ``u = (x * mask) A_s^T``, from ``dL/du``: ``(grad_u A_s) * mask``."""
    grad_x = grad_u @ cast(xp, A_s, grad_u.dtype)
    return grad_x if dropout_mask is None else grad_x * dropout_mask


def apply_weight(xp: Any, x: Any, weight: Any, bias: Any, fan_in_fan_out: bool) -> Any:
    """``x W^T + bias`` for a weight stored (out, in), or (in, out) with ``fan_in_fan_out``, in the dtype of ``x``."""
    W = cast(xp, weight.T if fan_in_fan_out else weight, x.dtype)
    return _fused.linear(xp, x, W, None if bias is None else cast(xp, bias, x.dtype))


def weight_input_grad(xp: Any, grad_y: Any, weight: Any, fan_in_fan_out: bool) -> Any:
    """``dL/dx = grad_y W`` of :func:`apply_weight`, in the dtype of ``grad_y``."""
    return grad_y @ cast(xp, weight.T if fan_in_fan_out else weight, grad_y.dtype)


def whole_forward(
    xp: Any, x: Any, u: Any, weight: Any, bias: Any, A_s: Any, C: Any, fan_in_fan_out: bool, *, merged: bool
) -> Any:
    """The whole layer ``x (W0 + C A_s)^T + bias`` in the dtype of ``x``, given ``u = x A_s^T``.

    Through ``W' = W0 + C A_s`` (``merged``) or as ``x W0^T + u C^T``. No checks: the
    checked-once internals of the dense forms (:func:`whole_input_grad` is their backward).
    """
    if merged:
        shifted = shifted_weight(xp, weight, C, A_s, fan_in_fan_out, dtype=x.dtype)
        return apply_weight(xp, x, shifted, bias, fan_in_fan_out)
    return add_product(xp, apply_weight(xp, x, weight, bias, fan_in_fan_out), u, C)


def whole_input_grad(xp: Any, grad: Any, weight: Any, C: Any, A_s: Any, fan_in_fan_out: bool, *, merged: bool) -> Any:
    """``grad (W0 + C A_s)`` in the dtype of ``grad``: through ``W'`` (``merged``) or as ``grad W0 + (grad C) A_s``."""
    if merged:
        shifted = shifted_weight(xp, weight, C, A_s, fan_in_fan_out, dtype=grad.dtype)
        return weight_input_grad(xp, grad, shifted, fan_in_fan_out)
    return add_product_t(xp, weight_input_grad(xp, grad, weight, fan_in_fan_out), product(xp, grad, C.T), A_s)


def delta_weight_matrix(xp: Any, C: Any, A_s: Any, fan_in_fan_out: bool) -> Any:
    """``C A_s`` (out x in), transposed to (in x out) for ``fan_in_fan_out`` layouts."""
    delta = C @ cast(xp, A_s, C.dtype)
    return delta.T if fan_in_fan_out else delta


def weight_shape(weight: Any, fan_in_fan_out: bool) -> tuple[int, int]:
    """``(out_features, in_features)`` of a weight stored (out, in) or (in, out)."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    return (cols, rows) if fan_in_fan_out else (rows, cols)


def wider(xp: Any, *dtypes: Any) -> Any:
    """The widest of the given floating dtypes, at least float32 (for accumulation)."""
    widest = xp.float32
    for dtype in dtypes:
        if dtype != widest and int(xp.finfo(dtype).bits) > int(xp.finfo(widest).bits):
            widest = dtype
    return widest


def check_on_weight(
    A: Any,
    B: Any,
    lambda_d: Any,
    lambda_b: Any,
    weight: Any,
    fan_in_fan_out: bool,
    *,
    activation_dtype: Any = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Any, AdapterShape]:
    """:func:`check_adapter` for a layer given by its weight, and ``lambda_b`` against its rows."""
    out_features, in_features = weight_shape(weight, fan_in_fan_out)
    xp, shape = check_adapter(
        A,
        B,
        lambda_d,
        lambda_b,
        in_features,
        activation_dtype=activation_dtype,
        extra={"weight": weight, **(extra or {})},
    )
    if shape.out_features != out_features:
        raise ValueError(f"lambda_b has length {shape.out_features} but the weight has {out_features} output features")
    return xp, shape


def backward_arguments(
    grad_y: Any,
    u: Any,
    A: Any,
    B: Any,
    lambda_d: Any,
    lambda_b: Any,
    in_features: int,
    *,
    check: bool,
    u_name: str = "u",
    extra: dict[str, Any] | None = None,
    weight: Any = None,
    fan_in_fan_out: bool = False,
) -> tuple[Any, AdapterShape]:
    """Namespace and sizes of a backward pass: its arguments checked, or taken as its checked forward left them.

    With ``weight`` (the dense paths) the adapter is checked against it, as :func:`check_on_weight` does.
    """
    if not check:
        return namespace(grad_y), AdapterShape(lambda_d.shape[0], lambda_b.shape[0], in_features)
    check_positive_int("in_features", in_features)
    named = {"grad_y": grad_y, u_name: u, **(extra or {})}
    if weight is None:
        xp, shape = check_adapter(A, B, lambda_d, lambda_b, in_features, activation_dtype=grad_y.dtype, extra=named)
    else:
        xp, shape = check_on_weight(
            A, B, lambda_d, lambda_b, weight, fan_in_fan_out, activation_dtype=grad_y.dtype, extra=named
        )
    check_activations("grad_y", grad_y, shape.out_features, "out_features on the last axis")
    check_same_shape(u_name, u, (*grad_y.shape[:-1], shape.rank), "grad_y with rank last")
    return xp, shape


def shifted_weight(
    xp: Any, weight: Any, C: Any, A_s: Any, fan_in_fan_out: bool, *, subtract: bool = False, dtype: Any = None
) -> Any:
    """``W0 + C A_s`` (or ``W0 - C A_s``) from checked arguments (no checks), as ``dtype``.

    ``C A_s`` is added to ``W0`` in the product's epilogue where the library fuses it, so
    the sum is rounded once. It is formed in float32 or wider (``dtype`` None: that dtype
    is returned), except for a 16-bit ``dtype``, where the product is 16-bit (float32
    accumulation) and rounded to 16 bits once, like the output of the factored form.
    """
    work = dtype if dtype is not None and is_half(xp, dtype) else wider(xp, weight.dtype, C.dtype)
    C = cast(xp, C, work)
    if subtract:  # the sign goes on the small C (exact negation), not on an (out x in) array
        C = -C
    W, A_w = cast(xp, weight, work), cast(xp, A_s, work)
    shifted = _fused.matmul_add(xp, W, A_w.T, C.T) if fan_in_fan_out else _fused.matmul_add(xp, W, C, A_w)
    return shifted if dtype is None else cast(xp, shifted, dtype)
