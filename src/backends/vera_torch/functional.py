"""The differentiable VeRA and DVoRA operations: ``torch.autograd.Function`` wrappers of the core.

The backend has no math of its own here: :class:`VeraFunction` and :class:`DvoraFunction`
call :func:`vera_core.vera_forward` / :func:`vera_core.vera_backward` and
:func:`vera_core.dvora_forward` / :func:`vera_core.dvora_backward` on torch tensors
(the core reaches torch through ``array_api_compat``).

Memory: the VeRA Function saves only ``u = x A_s^T`` (tokens x r) besides the small
shared matrices and vectors; ``x`` is *not* saved (the base layer keeps its own copy for
its own backward). The DVoRA Function saves ``u`` and ``z`` (tokens x out, the output
before scaling) because ``dL/dm`` needs ``sum_t g * z``.

Both take the base layer's output as an input and return the adapted output, so the
frozen layer (possibly quantized, without an accessible weight) runs under ordinary
autograd and receives its gradient from the Function's backward.
"""

from __future__ import annotations

from typing import Any

import torch
from array_api_compat import torch as xp

import vera_core as vc
from vera_core import _lowrank as lr
from vera_core import dvora as dvora_internals

__all__ = [
    "DvoraFunction",
    "DvoraLinearFunction",
    "VeraFunction",
    "VeraLinearFunction",
    "dvora",
    "dvora_linear",
    "vera",
    "vera_linear",
]


class VeraFunction(torch.autograd.Function):
    """``y = base + lambda_b * (B_s (lambda_d * (A_s (x * mask))))`` with the core's gradients.

    Inputs (positional): ``base`` (..., out), ``x`` (..., in), ``A`` (R, max_in),
    ``B`` (max_out, R), ``lambda_d`` (r,), ``lambda_b`` (out,), ``dropout_mask``
    (..., in) or None. ``A``/``B`` never receive gradients.
    """

    @staticmethod
    def forward(ctx, base, x, A, B, lambda_d, lambda_b, dropout_mask):
        y, u = vc.vera_forward(x, A, B, lambda_d, lambda_b, base=base, dropout_mask=dropout_mask)
        ctx.save_for_backward(u, A, B, lambda_d, lambda_b, dropout_mask)
        ctx.in_features = x.shape[-1]
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, A, B, lambda_d, lambda_b, dropout_mask = ctx.saved_tensors
        grads = vc.vera_backward(
            grad_y,
            u,
            A,
            B,
            lambda_d,
            lambda_b,
            in_features=ctx.in_features,
            dropout_mask=dropout_mask,
            input_grad=ctx.needs_input_grad[1],
            check=False,  # forward checked these; autograd matched grad_y to y
        )
        grad_base = grad_y if ctx.needs_input_grad[0] else None
        return grad_base, grads.x, None, None, grads.lambda_d, grads.lambda_b, None


class VeraLinearFunction(torch.autograd.Function):
    """The whole adapted layer ``x (W0 + dW)^T + bias`` as one autograd node, from the frozen weight.

    The unchecked internals of :func:`vera_core.vera_forward_dense` /
    :func:`vera_core.vera_backward_dense` (``vera_core._lowrank.whole_forward``,
    ``whole_input_grad``), each pass through the merged weight or factored as ``merged``
    (forward, backward) says (see :func:`vera_core.merged_passes`). It saves ``u``
    (tokens x r) alone, never a merged weight (rebuilt in backward when needed) nor the
    folded ``C`` (folded again), and computes the frozen layer's share of ``dL/dx`` itself.

    Inputs: ``x``; ``weight`` (frozen) and ``bias`` (trained or not); ``projections``, the
    tuple ``(A_s^T, B_s^T, A_s, B_s)`` with ``A_s`` (r x in) in the dtype of ``x`` and ``B_s``
    (out x r) in the vectors' (constants: no gradient, not saved as tensors); ``lambda_d``
    (1, r) and ``lambda_b`` (1, out) (a bank's rows); ``fan_in_fan_out``; ``merged``. The
    caller checked them (:func:`vera_linear`, or a layer when its adapters changed).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, projections, lambda_d, lambda_b, fan_in_fan_out, merged):
        A_t, _, A_s, B_s = projections
        C = lr.fold(xp, B_s, lambda_d, lambda_b)
        u = lr.project_t(xp, x, A_t)
        y = lr.whole_forward(xp, x, u, weight, bias, A_s, C, fan_in_fan_out, merged=merged[0])
        ctx.save_for_backward(u, weight, lambda_d, lambda_b)
        ctx.projections, ctx.fan_in_fan_out, ctx.merged_backward = projections, fan_in_fan_out, merged[1]
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, weight, lambda_d, lambda_b = ctx.saved_tensors
        A_s, B_s = ctx.projections[2:]
        grad_d, grad_b = lr.vector_grads(xp, lr.token_gram(xp, grad_y, u, lambda_d.dtype), B_s, lambda_d, lambda_b)
        needs = ctx.needs_input_grad
        grad_x = grad_bias = None
        if needs[0]:
            C = lr.fold(xp, B_s, lambda_d, lambda_b)  # folded again, as in forward: out x r is not kept per layer
            grad_x = lr.whole_input_grad(xp, grad_y, weight, C, A_s, ctx.fan_in_fan_out, merged=ctx.merged_backward)
        if needs[2]:
            grad_bias = xp.sum(lr.flatten_tokens(xp, grad_y), axis=0, dtype=lambda_d.dtype)
        return grad_x, None, grad_bias, None, grad_d, grad_b, None, None


def vera_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    *,
    fan_in_fan_out: bool = False,
    merged: tuple[bool, bool] = (True, True),
) -> torch.Tensor:
    """Differentiable ``x (W0 + dW)^T + bias`` (frozen ``weight``), no dropout.

    Checks its arguments (:func:`vera_core.check_whole_layer`), then runs
    :class:`VeraLinearFunction`. ``merged``: (forward, backward) through ``W0 + dW``, e.g.
    from :func:`vera_core.merged_passes`.

    Examples
    --------
    >>> import torch, vera_core as vc
    >>> from array_api_compat import torch as xp
    >>> A, B = vc.generate_projections(0, 4, 8, 6, xp=xp)
    >>> x, W = torch.randn(3, 8), torch.randn(6, 8)
    >>> d, b = torch.full((4,), 0.1), torch.ones(6, requires_grad=True)
    >>> y = vera_linear(x, W, None, A, B, d, b, merged=vc.merged_passes(3, 8, 6, 4))
    >>> bool(torch.allclose(y, vera(x @ W.T, x, A, B, d, b), atol=1e-5))
    True
    """
    _, shape = vc.check_whole_layer(x, weight, A, B, lambda_d, lambda_b, bias=bias, fan_in_fan_out=fan_in_fan_out)
    projections = _projections(A, B, shape, x.dtype, lambda_d.dtype)
    rows = (lambda_d[None, :], lambda_b[None, :])
    return VeraLinearFunction.apply(x, weight, bias, projections, *rows, fan_in_fan_out, tuple(merged))


def _projections(A: torch.Tensor, B: torch.Tensor, shape: Any, dtype: torch.dtype, vector_dtype: torch.dtype) -> tuple:
    """``(A_s^T, B_s^T, A_s, B_s)``: the layer's slices, ``A_s`` in the activations' dtype, ``B_s`` in the vectors'."""
    A_s, B_s = lr.layer_slices(A, B, shape)
    A_s, B_s = lr.cast(xp, A_s, dtype), lr.cast(xp, B_s, vector_dtype)
    return A_s.T, B_s.T, A_s, B_s


def vera(
    base: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable VeRA output ``base + lambda_b * (B_s (lambda_d * (A_s x)))``.

    Parameters
    ----------
    base : Tensor, shape (..., out)
        The frozen layer's output (``x W0^T + b``), in the dtype of ``x``.
    x : Tensor, shape (..., in)
        The layer input.
    A, B : Tensor
        The shared projections (R x max_in) and (max_out x R); sliced to the layer.
    lambda_d : Tensor, shape (r,)
    lambda_b : Tensor, shape (out,)
        The trainable vectors (dtype of ``x``, or float32 beside 16-bit ``x``).
    dropout_mask : Tensor, shape (..., in), optional
        Zeros and ``1 / (1 - p)``, applied to ``x`` on the adapter path.

    Returns
    -------
    Tensor, shape (..., out)

    Examples
    --------
    >>> import torch, vera_core as vc
    >>> from array_api_compat import torch as xp
    >>> A, B = vc.generate_projections(0, 4, 8, 6, xp=xp)
    >>> x = torch.randn(3, 8)
    >>> d = torch.full((4,), 0.1, requires_grad=True)
    >>> b = torch.zeros(6, requires_grad=True)
    >>> y = vera(torch.zeros(3, 6), x, A, B, d, b)
    >>> y.sum().backward()
    >>> b.grad.shape, bool(torch.all(y == 0))
    (torch.Size([6]), True)
    """
    return VeraFunction.apply(base, x, A, B, lambda_d, lambda_b, dropout_mask)


class DvoraFunction(torch.autograd.Function):
    """``y = (m / n) * (base + x_drop dW^T) + bias`` with the core's analytic gradients.

    Inputs (positional): ``base`` (..., out) is ``x W0^T`` *without* bias; ``x``;
    the three :class:`vera_core.DvoraFrozen` tensors; ``A``; ``B``; ``magnitude``;
    ``lambda_d``; ``lambda_b``; ``bias`` or None; ``dropout_mask`` or None;
    ``detach_norm`` (bool). The gradient for ``base`` is pushed through the frozen
    layer by autograd.
    """

    @staticmethod
    def forward(
        ctx,
        base,
        x,
        weight_sq_norm,
        weight_proj,
        gram,
        A,
        B,
        magnitude,
        lambda_d,
        lambda_b,
        bias,
        dropout_mask,
        detach_norm,
    ):
        frozen = vc.DvoraFrozen(weight_sq_norm, weight_proj, gram)
        y, saved = vc.dvora_forward(
            x, base, frozen, A, B, magnitude, lambda_d, lambda_b, bias=bias, dropout_mask=dropout_mask
        )
        ctx.save_for_backward(
            saved.u,
            saved.z,
            saved.norm,
            weight_sq_norm,
            weight_proj,
            gram,
            A,
            B,
            magnitude,
            lambda_d,
            lambda_b,
            dropout_mask,
        )
        ctx.in_features = x.shape[-1]
        ctx.detach_norm = bool(detach_norm)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, z, norm, sq, proj, gram, A, B, magnitude, lambda_d, lambda_b, dropout_mask = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = vc.dvora_backward(
            grad_y,
            vc.DvoraSaved(u, z, norm),
            vc.DvoraFrozen(sq, proj, gram),
            A,
            B,
            magnitude,
            lambda_d,
            lambda_b,
            in_features=ctx.in_features,
            detach_norm=ctx.detach_norm,
            has_bias=ctx.has_bias and needs[10],
            dropout_mask=dropout_mask,
            input_grad=needs[1],
            check=False,
        )
        grad_bias = None if grads.bias is None else grads.bias
        return (
            grads.base if needs[0] else None,
            grads.x,
            None,
            None,
            None,
            None,
            None,
            grads.magnitude,
            grads.lambda_d,
            grads.lambda_b,
            grad_bias,
            None,
            None,
        )


def dvora(
    base: torch.Tensor,
    x: torch.Tensor,
    frozen: vc.DvoraFrozen,
    A: torch.Tensor,
    B: torch.Tensor,
    magnitude: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    *,
    detach_norm: bool = False,
) -> torch.Tensor:
    """Differentiable DVoRA output ``(m / n) * (base + x dW^T) + bias``.

    Parameters
    ----------
    base : Tensor, shape (..., out)
        ``x W0^T`` without the bias.
    x : Tensor, shape (..., in)
    frozen : vera_core.DvoraFrozen
        From :func:`vera_core.dvora_precompute` (computed once per layer).
    A, B, magnitude, lambda_d, lambda_b : Tensor
        Shared projections and the trainable vectors.
    bias : Tensor, optional
        Added after scaling; receives a gradient when it requires one.
    dropout_mask : Tensor, optional
    detach_norm : bool
        Treat the row norm as a constant in backward (DoRA section 4.3).

    Examples
    --------
    >>> import torch, vera_core as vc
    >>> from array_api_compat import torch as xp
    >>> A, B = vc.generate_projections(0, 4, 8, 6, xp=xp)
    >>> W, x = torch.randn(6, 8), torch.randn(3, 8)
    >>> frozen = vc.dvora_precompute(W, A, 4)
    >>> m = vc.initial_magnitude(W).requires_grad_()
    >>> y = dvora(x @ W.T, x, frozen, A, B, m, torch.full((4,), 0.1), torch.zeros(6))
    >>> torch.allclose(y, x @ W.T, atol=1e-5)
    True
    """
    return DvoraFunction.apply(
        base,
        x,
        frozen.weight_sq_norm,
        frozen.weight_proj,
        frozen.gram,
        A,
        B,
        magnitude,
        lambda_d,
        lambda_b,
        bias,
        dropout_mask,
        detach_norm,
    )


class DvoraLinearFunction(torch.autograd.Function):
    """DVoRA's whole layer from the frozen weight as one autograd node.

    The unchecked internals of :func:`vera_core.dvora_forward_dense` /
    :func:`vera_core.dvora_backward_dense`, each pass through the merged weight or
    factored as ``merged`` (forward, backward) says. Inputs: ``x``; the frozen ``weight``;
    ``bias`` or None (trained or not); the three :class:`vera_core.DvoraFrozen` tensors;
    ``projections`` as in :class:`VeraLinearFunction`; ``magnitude``, ``lambda_d``,
    ``lambda_b`` as (1, n) rows; ``fan_in_fan_out``; ``detach_norm``; ``merged``. Saves
    ``u``, ``z`` and the norms; a merged weight is rebuilt in backward.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        weight_sq_norm,
        weight_proj,
        gram,
        projections,
        magnitude,
        lambda_d,
        lambda_b,
        fan_in_fan_out,
        detach_norm,
        merged,
    ):
        A_t, _, A_s, B_s = projections
        frozen = vc.DvoraFrozen(weight_sq_norm, weight_proj, gram)
        C = lr.fold(xp, B_s, lambda_d, lambda_b)
        u = lr.project_t(xp, x, A_t)
        y, saved = dvora_internals._whole_forward(
            xp, x, u, weight, bias, frozen, A_s, C, magnitude, fan_in_fan_out, merged=merged[0]
        )
        ctx.save_for_backward(*saved, C, weight, *frozen, magnitude, lambda_d, lambda_b)
        ctx.projections, ctx.fan_in_fan_out, ctx.detach_norm = projections, fan_in_fan_out, bool(detach_norm)
        ctx.has_bias, ctx.merged_backward = bias is not None, merged[1]
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, z, norm, C, weight, sq, proj, gram, magnitude, lambda_d, lambda_b = ctx.saved_tensors
        B_s = ctx.projections[3]
        needs = ctx.needs_input_grad
        grads, scale = dvora_internals._vector_grads(
            xp,
            grad_y,
            vc.DvoraSaved(u, z, norm),
            vc.DvoraFrozen(sq, proj, gram),
            B_s,
            C,
            magnitude,
            lambda_d,
            lambda_b,
            detach_norm=ctx.detach_norm,
            has_bias=ctx.has_bias and needs[2],
        )
        grad_x = None
        if needs[0]:
            grad_x = dvora_internals._whole_input_grad(
                xp, grad_y, scale, weight, C, ctx.projections[2], ctx.fan_in_fan_out, merged=ctx.merged_backward
            )
        return (
            grad_x,
            None,
            grads.bias,
            None,
            None,
            None,
            None,
            grads.magnitude,
            grads.lambda_d,
            grads.lambda_b,
            None,
            None,
            None,
        )


def dvora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    frozen: vc.DvoraFrozen,
    A: torch.Tensor,
    B: torch.Tensor,
    magnitude: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    *,
    fan_in_fan_out: bool = False,
    detach_norm: bool = False,
    merged: tuple[bool, bool] = (True, True),
) -> torch.Tensor:
    """Differentiable DVoRA output from the frozen weight, no dropout.

    Checks its arguments (:func:`vera_core.check_dvora_whole_layer`), then runs
    :class:`DvoraLinearFunction`; ``merged`` as in :func:`vera_linear`.

    Examples
    --------
    >>> import torch, vera_core as vc
    >>> from array_api_compat import torch as xp
    >>> A, B = vc.generate_projections(0, 4, 8, 6, xp=xp)
    >>> x, W = torch.randn(3, 8), torch.randn(6, 8)
    >>> frozen, m = vc.dvora_precompute(W, A, 4), vc.initial_magnitude(W).requires_grad_(True)
    >>> d, b = torch.full((4,), 0.1), torch.ones(6)
    >>> y = dvora_linear(x, W, None, frozen, A, B, m, d, b, merged=(False, True))
    >>> bool(torch.allclose(y, dvora(x @ W.T, x, frozen, A, B, m, d, b), atol=1e-5))
    True
    """
    _, shape = vc.check_dvora_whole_layer(
        x, weight, frozen, A, B, magnitude, lambda_d, lambda_b, bias=bias, fan_in_fan_out=fan_in_fan_out
    )
    projections = _projections(A, B, shape, x.dtype, lambda_d.dtype)
    rows = (magnitude[None, :], lambda_d[None, :], lambda_b[None, :])
    return DvoraLinearFunction.apply(
        x, weight, bias, *frozen, projections, *rows, fan_in_fan_out, detach_norm, tuple(merged)
    )
