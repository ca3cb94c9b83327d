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

import torch

import vera_core as vc

__all__ = [
    "DvoraDenseFunction",
    "DvoraFunction",
    "VeraDenseFunction",
    "VeraFunction",
    "dvora",
    "dvora_dense",
    "vera",
    "vera_dense",
]


def _flat(vector: torch.Tensor) -> torch.Tensor:
    """A vector given as a one-row matrix (an adapter bank's row), as a vector (a view)."""
    return vector if vector.dim() == 1 else vector.view(-1)


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


class VeraDenseFunction(torch.autograd.Function):
    """The whole adapted layer ``x (W0 + dW)^T + bias`` through the merged weight.

    :func:`vera_core.vera_forward_dense` / :func:`vera_core.vera_backward_dense`: for many
    tokens it needs fewer multiply-adds than the factored form (see
    :func:`vera_core.dense_is_cheaper`), and it saves the same ``u`` (tokens x r); the
    merged weight is rebuilt in backward, not kept. Inputs: ``x``, ``weight`` and
    ``bias`` (frozen), ``A``, ``B``, ``lambda_d``, ``lambda_b``, ``fan_in_fan_out``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, lambda_d, lambda_b, fan_in_fan_out):
        ctx.vector_shapes = (lambda_d.shape, lambda_b.shape)
        lambda_d, lambda_b = _flat(lambda_d), _flat(lambda_b)
        y, u = vc.vera_forward_dense(x, weight, A, B, lambda_d, lambda_b, bias=bias, fan_in_fan_out=fan_in_fan_out)
        ctx.save_for_backward(u, weight, A, B, lambda_d, lambda_b)
        ctx.fan_in_fan_out = fan_in_fan_out
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, weight, A, B, lambda_d, lambda_b = ctx.saved_tensors
        grads = vc.vera_backward_dense(
            grad_y,
            u,
            weight,
            A,
            B,
            lambda_d,
            lambda_b,
            fan_in_fan_out=ctx.fan_in_fan_out,
            input_grad=ctx.needs_input_grad[0],
            check=False,
        )
        d_shape, b_shape = ctx.vector_shapes
        return grads.x, None, None, None, None, grads.lambda_d.view(d_shape), grads.lambda_b.view(b_shape), None


def vera_dense(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    *,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """Differentiable ``x (W0 + dW)^T + bias`` (frozen ``weight`` and ``bias``, float32 or wider).

    Examples
    --------
    >>> import torch, vera_core as vc
    >>> from array_api_compat import torch as xp
    >>> A, B = vc.generate_projections(0, 4, 8, 6, xp=xp)
    >>> x, W = torch.randn(3, 8), torch.randn(6, 8)
    >>> d, b = torch.full((4,), 0.1), torch.ones(6, requires_grad=True)
    >>> y = vera_dense(x, W, None, A, B, d, b)
    >>> bool(torch.allclose(y, vera(x @ W.T, x, A, B, d, b), atol=1e-5))
    True
    """
    return VeraDenseFunction.apply(x, weight, bias, A, B, lambda_d, lambda_b, fan_in_fan_out)


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


class DvoraDenseFunction(torch.autograd.Function):
    """DVoRA through the merged weight (:func:`vera_core.dvora_forward_dense`), for many tokens.

    Inputs: ``x``; the frozen ``weight``; ``bias`` or None (trained or not); the three
    :class:`vera_core.DvoraFrozen` tensors; ``A``; ``B``; ``magnitude``; ``lambda_d``;
    ``lambda_b``; ``fan_in_fan_out``; ``detach_norm``. Saves ``u``, ``z`` and the norms,
    as the factored Function does; the merged weight is rebuilt in backward.
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
        A,
        B,
        magnitude,
        lambda_d,
        lambda_b,
        fan_in_fan_out,
        detach_norm,
    ):
        ctx.vector_shapes = (magnitude.shape, lambda_d.shape, lambda_b.shape)
        magnitude, lambda_d, lambda_b = _flat(magnitude), _flat(lambda_d), _flat(lambda_b)
        frozen = vc.DvoraFrozen(weight_sq_norm, weight_proj, gram)
        y, saved = vc.dvora_forward_dense(
            x, weight, frozen, A, B, magnitude, lambda_d, lambda_b, bias=bias, fan_in_fan_out=fan_in_fan_out
        )
        ctx.save_for_backward(
            saved.u,
            saved.z,
            saved.norm,
            weight,
            weight_sq_norm,
            weight_proj,
            gram,
            A,
            B,
            magnitude,
            lambda_d,
            lambda_b,
        )
        ctx.fan_in_fan_out, ctx.detach_norm, ctx.has_bias = fan_in_fan_out, bool(detach_norm), bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, z, norm, weight, sq, proj, gram, A, B, magnitude, lambda_d, lambda_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = vc.dvora_backward_dense(
            grad_y,
            vc.DvoraSaved(u, z, norm),
            vc.DvoraFrozen(sq, proj, gram),
            weight,
            A,
            B,
            magnitude,
            lambda_d,
            lambda_b,
            fan_in_fan_out=ctx.fan_in_fan_out,
            detach_norm=ctx.detach_norm,
            has_bias=ctx.has_bias and needs[2],
            input_grad=needs[0],
            check=False,
        )
        m_shape, d_shape, b_shape = ctx.vector_shapes
        return (
            grads.x,
            None,
            grads.bias,
            None,
            None,
            None,
            None,
            None,
            grads.magnitude.view(m_shape),
            grads.lambda_d.view(d_shape),
            grads.lambda_b.view(b_shape),
            None,
            None,
        )


def dvora_dense(
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
) -> torch.Tensor:
    """Differentiable DVoRA output through the merged weight (float32 or wider, no dropout).

    Examples
    --------
    >>> import torch, vera_core as vc
    >>> from array_api_compat import torch as xp
    >>> A, B = vc.generate_projections(0, 4, 8, 6, xp=xp)
    >>> x, W = torch.randn(3, 8), torch.randn(6, 8)
    >>> frozen, m = vc.dvora_precompute(W, A, 4), vc.initial_magnitude(W).requires_grad_(True)
    >>> d, b = torch.full((4,), 0.1), torch.ones(6)
    >>> y = dvora_dense(x, W, None, frozen, A, B, m, d, b)
    >>> bool(torch.allclose(y, dvora(x @ W.T, x, frozen, A, B, m, d, b), atol=1e-5))
    True
    """
    return DvoraDenseFunction.apply(
        x, weight, bias, *frozen, A, B, magnitude, lambda_d, lambda_b, fan_in_fan_out, detach_norm
    )
