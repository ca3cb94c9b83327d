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


def matmul_add(xp: Any, c: Any, a: Any, b: Any) -> Any:
    """``c + a @ b`` for 2-D arrays (``torch.addmm``: the sum happens in the product's epilogue)."""
    if is_torch_namespace(xp):
        return xp.addmm(c, a, b)
    return c + a @ b


def linear(xp: Any, x: Any, weight_t: Any, bias: Any) -> Any:
    """``x @ weight_t + bias`` (``bias`` may be None), ``x`` of shape (..., in), ``weight_t`` (in, out).

    PyTorch: ``torch.nn.functional.linear``, which adds the bias in the product's epilogue.
    """
    if is_torch_namespace(xp):
        return xp.nn.functional.linear(x, weight_t.T, bias)
    y = x @ weight_t
    return y if bias is None else y + bias


def scale_add(xp: Any, z: Any, scale: Any, bias: Any) -> Any:
    """``z * scale + bias`` (``bias`` may be None), ``scale`` and ``bias`` broadcast on the last axis.

    PyTorch: ``torch.addcmul``, one pass over ``z``.
    """
    if bias is None:
        return z * scale
    if is_torch_namespace(xp):
        return xp.addcmul(bias, z, scale)
    return z * scale + bias
