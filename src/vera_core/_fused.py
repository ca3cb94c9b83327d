"""Fused forms of a few standard expressions, for the array libraries that have one.

Each function computes a plain Array API expression; where the namespace is PyTorch's
(``array_api_compat.is_torch_namespace``) it calls the single fused kernel PyTorch has
for it (a matrix product whose epilogue adds, a multiply-add), which reads and writes the
large operand once instead of twice. The results are the same up to rounding (the fused
kernels round once). Everything else takes the standard expression.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import is_torch_namespace


def matmul_add(xp: Any, c: Any, a: Any, b: Any, *, beta: float = 1.0) -> Any:
    """``beta * c + a @ b`` for 2-D arrays (``torch.addmm``: the sum happens in the product's epilogue)."""
    if is_torch_namespace(xp):
        return xp.addmm(c, a, b, beta=beta)
    return (c if beta == 1.0 else beta * c) + a @ b


def batch_matmul_add(xp: Any, c: Any, a: Any, b: Any) -> Any:
    """``c + a @ b`` for 3-D arrays (``torch.baddbmm``: the sum happens in the product's epilogue)."""
    if is_torch_namespace(xp):
        return xp.baddbmm(c, a, b)
    return c + a @ b


def add_product(xp: Any, c: Any, a: Any, b: Any) -> Any:
    """``c + a * b`` (broadcasting); PyTorch: ``torch.addcmul``, one pass."""
    if is_torch_namespace(xp):
        return xp.addcmul(c, a, b)
    return c + a * b


def linear(xp: Any, x: Any, weight: Any, bias: Any) -> Any:
    """``x @ weight.T + bias`` (``bias`` may be None), ``x`` of shape (..., in), ``weight`` (out, in).

    PyTorch: ``torch.nn.functional.linear``, which takes the transpose as a flag (no view
    to create) and adds the bias in the product's epilogue.
    """
    if is_torch_namespace(xp):
        return xp.nn.functional.linear(x, weight, bias)
    y = x @ weight.T
    return y if bias is None else y + bias


def scale_add(xp: Any, z: Any, scale: Any, bias: Any) -> Any:
    """``z * scale + bias`` (``bias`` may be None), ``scale`` and ``bias`` broadcast on the last axis.

    PyTorch: ``torch.addcmul``, one pass over ``z``.
    """
    return z * scale if bias is None else add_product(xp, bias, z, scale)


def sub_product(xp: Any, c: Any, a: Any, b: Any) -> Any:
    """``c - a * b`` (broadcasting); PyTorch: ``torch.addcmul(c, a, b, value=-1)``, one pass."""
    if is_torch_namespace(xp):
        return xp.addcmul(c, a, b, value=-1)
    return c - a * b


def clamp_min(xp: Any, a: Any, bound: float) -> Any:
    """``maximum(a, bound)`` for a Python float ``bound``, without a host-to-device copy.

    PyTorch: ``torch.clamp_min`` takes the bound as a scalar argument. Elsewhere the bound
    is filled on ``a``'s device (``asarray`` of a Python float would be a synchronising
    copy), and ``maximum`` rather than array-api-compat's ``clip``, which synchronises
    CuPy (boolean indexing).
    """
    if is_torch_namespace(xp):
        return xp.clamp_min(a, bound)
    return xp.maximum(a, xp.full_like(a, bound))
