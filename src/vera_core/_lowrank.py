"""Pieces shared by VeRA and DVoRA: layer slices, the folded matrix, vector gradients.

Everything is written in terms of the folded matrix ``C = diag(lambda_b) B_s diag(lambda_d)``
(out x r), so that ``delta W = C A_s`` and the adapter output is ``(x A_s^T) C^T``: the
vectors are applied to the small matrix instead of to the (tokens x out) activations.
"""

from __future__ import annotations

from typing import Any

from vera_core._fused import matmul_add
from vera_core._validation import AdapterShape, check_adapter, is_half


def layer_slices(A: Any, B: Any, shape: AdapterShape) -> tuple[Any, Any]:
    """``A[:r, :in]`` and ``B[:out, :r]``: the parts of the shared matrices one layer uses."""
    return A[: shape.rank, : shape.in_features], B[: shape.out_features, : shape.rank]


def cast(xp: Any, array: Any, dtype: Any) -> Any:
    """``array`` as ``dtype``, without a copy when it already is."""
    return array if array.dtype == dtype else xp.astype(array, dtype)


def fold(xp: Any, B_s: Any, lambda_d: Any, lambda_b: Any) -> Any:
    """``C = diag(lambda_b) B_s diag(lambda_d)`` (out x r), in the vectors' dtype."""
    return lambda_b[:, None] * cast(xp, B_s, lambda_d.dtype) * lambda_d[None, :]


def project(xp: Any, x: Any, A_s: Any, dropout_mask: Any) -> Any:
    """``u = (x * mask) A_s^T`` (..., r) in the dtype of ``x``."""
    if dropout_mask is not None:
        x = x * dropout_mask
    return x @ cast(xp, A_s, x.dtype).T


def flatten_tokens(xp: Any, array: Any) -> Any:
    """Collapse the leading dimensions: (..., f) -> (tokens, f)."""
    return xp.reshape(array, (-1, array.shape[-1]))


def token_gram(xp: Any, grad: Any, u: Any, dtype: Any) -> Any:
    """``grad^T u`` summed over every token (out x r), returned in ``dtype``."""
    total = flatten_tokens(xp, grad).T @ flatten_tokens(xp, u)
    return cast(xp, total, dtype)


def vector_grads(xp: Any, grad_C: Any, B_s: Any, lambda_d: Any, lambda_b: Any) -> tuple[Any, Any]:
    """Chain ``dL/dC`` to ``(dL/dlambda_d, dL/dlambda_b)`` through ``C = diag(b) B diag(d)``."""
    weighted = grad_C * cast(xp, B_s, grad_C.dtype)
    grad_d = xp.sum(weighted * lambda_b[:, None], axis=0)
    grad_b = xp.sum(weighted * lambda_d[None, :], axis=1)
    return grad_d, grad_b


def input_grad(xp: Any, grad: Any, C: Any, A_s: Any, dropout_mask: Any) -> Any:
    """``dL/dx`` of the adapter term: ``((grad C) A_s) * mask``."""
    grad_u = grad @ cast(xp, C, grad.dtype)
    grad_x = grad_u @ cast(xp, A_s, grad.dtype)
    return grad_x if dropout_mask is None else grad_x * dropout_mask


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
        if int(xp.finfo(dtype).bits) > int(xp.finfo(widest).bits):
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


def shifted_weight(
    xp: Any,
    shape: AdapterShape,
    weight: Any,
    A: Any,
    B: Any,
    lambda_d: Any,
    lambda_b: Any,
    fan_in_fan_out: bool,
    *,
    subtract: bool = False,
) -> Any:
    """``W0 + dW`` (or ``W0 - dW``) in float32 or wider, from checked arguments (no checks)."""
    A_s, B_s = layer_slices(A, B, shape)
    work = wider(xp, weight.dtype, lambda_d.dtype)
    C = cast(xp, fold(xp, B_s, lambda_d, lambda_b), work)
    # the sign goes on the small C (exact negation), not on an extra (out x in) array
    return cast(xp, weight, work) + delta_weight_matrix(xp, -C if subtract else C, A_s, fan_in_fan_out)


def merged_weight(
    xp: Any,
    shape: AdapterShape,
    weight: Any,
    A: Any,
    B: Any,
    lambda_d: Any,
    lambda_b: Any,
    fan_in_fan_out: bool,
    dtype: Any,
) -> Any:
    """``W0 + dW`` in the activations' ``dtype``, for the merged-weight (dense) products.

    float32 or wider: :func:`shifted_weight`, cast. 16-bit: ``C A_s`` as a 16-bit product
    (float32 accumulation) added to ``W0`` in the product's epilogue where the library fuses
    it, so the sum is rounded to 16 bits once, like the output of the factored form.
    """
    if not is_half(xp, dtype):
        return cast(xp, shifted_weight(xp, shape, weight, A, B, lambda_d, lambda_b, fan_in_fan_out), dtype)
    A_s, B_s = layer_slices(A, B, shape)
    C = cast(xp, fold(xp, B_s, lambda_d, lambda_b), dtype)
    A_h, W = cast(xp, A_s, dtype), cast(xp, weight, dtype)
    return matmul_add(xp, W, A_h.T, C.T) if fan_in_fan_out else matmul_add(xp, W, C, A_h)
