"""Layers with an explicit backward pass: ``Linear``, ``VeraLinear``, ``DVoraLinear``, ``ReLU``.

``AdaptedLinear`` is the common base of the two adapter layers.

Every layer follows the protocol described in :mod:`vera_numpy`: ``forward(x)`` caches
what ``backward`` needs; ``backward(grad_y)`` accumulates the parameter gradients and
returns ``dL/dx``. The adapter math is the core's (:func:`vera_core.vera_forward`,
:func:`vera_core.dvora_backward`, ...); this module only wires it together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

import vera_core as vc
from vera_core._validation import is_real_float
from vera_core.projections import MATRIX_A
from vera_numpy._backend import vector_dtype


def _flat(xp: Any, array: Any) -> Any:
    """(..., f) -> (tokens, f)."""
    return xp.reshape(array, (-1, array.shape[-1]))


def _token_sum(xp: Any, grad: Any, dtype: Any) -> Any:
    """``grad`` summed over every token, in ``dtype``: the gradient of an added bias."""
    return xp.sum(_flat(xp, grad), axis=0, dtype=dtype)


def _copy(xp: Any, array: Any, dtype: Any = None) -> Any:
    """A fresh copy of ``array`` (optionally cast), so training never writes into the caller's arrays."""
    return xp.asarray(array if dtype is None else xp.astype(array, dtype), copy=True)


def copy_into(targets: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """Overwrite each array of ``targets`` in place with ``values`` of the same name and shape.

    Every entry is checked before any is copied: KeyError for a name ``targets`` lacks,
    ValueError for a shape mismatch, TypeError for a value that is not a real floating
    array; nothing is changed then.
    """
    unknown = sorted(set(values) - set(targets))
    if unknown:
        raise KeyError(f"no parameters named {', '.join(unknown)}; known: {', '.join(sorted(targets)) or 'none'}")
    for name, value in values.items():
        target = targets[name]
        if not hasattr(value, "shape") or tuple(value.shape) != tuple(target.shape):
            got = tuple(value.shape) if hasattr(value, "shape") else type(value).__name__
            raise ValueError(f"parameter {name!r} has shape {tuple(target.shape)}, got {got}")
        if not is_real_float(array_namespace(value), value.dtype):
            raise TypeError(f"parameter {name!r} must be a real floating array, got dtype {value.dtype}")
    for name, value in values.items():
        target = targets[name]
        xp = array_namespace(target)
        target[...] = xp.astype(value, target.dtype)


def dropout_mask(xp: Any, x: Any, p: Any, stream: int) -> Any:
    """An inverted-dropout mask for ``x``: zeros with probability ``p``, else ``1 / (1 - p)``.

    The uniform numbers come from the core's counter-based generator (stream ``stream``),
    so masks are reproducible and identical on every backend and device. ``p`` is a
    number, or an array of one probability per leading row of ``x`` (mixed-adapter
    batches, each row its adapter's).

    Examples
    --------
    >>> import numpy as np
    >>> mask = dropout_mask(np, np.ones((2, 1000), np.float32), np.asarray([0.0, 0.5], np.float32), 7)
    >>> bool(np.all(mask[0] == 1)), sorted(set(mask[1].tolist()))
    (True, [0.0, 2.0])
    """
    flat = _flat(xp, x)
    uniform = vc.kaiming_uniform(
        stream,
        MATRIX_A,
        tuple(flat.shape),
        6,  # fan_in 6: uniform on [-1, 1)
        xp=xp,
        dtype=x.dtype,
        device=device_of(x),
    )
    uniform = xp.reshape(uniform, x.shape)
    if not isinstance(p, float | int):
        p = xp.reshape(xp.astype(p, x.dtype), (x.shape[0],) + (1,) * (x.ndim - 1))
    return xp.astype(uniform >= 2.0 * p - 1.0, x.dtype) / (1.0 - p)


class Layer:
    """Base class: trainable parameters by name, their accumulated gradients, train/eval mode.

    Subclasses register trainable arrays in ``self._params`` and implement
    :meth:`forward` and :meth:`backward`; :meth:`backward` adds into the gradients
    with :meth:`_accumulate`, so two backward passes before :meth:`zero_grad` sum.
    """

    def __init__(self) -> None:
        self._params: dict[str, Any] = {}
        self._grads: dict[str, Any] = {}
        self.training = True

    def forward(self, x: Any) -> Any:
        """The layer output; caches what :meth:`backward` needs."""
        raise NotImplementedError

    def backward(self, grad_y: Any, *, input_grad: bool = True) -> Any:
        """Accumulate parameter gradients from ``dL/dy``; return ``dL/dx`` (None unless ``input_grad``)."""
        raise NotImplementedError

    def __call__(self, x: Any) -> Any:
        return self.forward(x)

    def parameters(self) -> dict[str, Any]:
        """The trainable arrays by name (the arrays themselves: optimisers update them in place)."""
        return dict(self._params)

    def grads(self) -> dict[str, Any]:
        """The accumulated gradients by name (only parameters reached by a backward pass)."""
        return dict(self._grads)

    def zero_grad(self) -> None:
        """Forget the accumulated gradients."""
        self._grads.clear()

    def train(self, mode: bool = True) -> Layer:
        """Training mode (dropout active) or, with ``mode=False``, evaluation mode."""
        self.training = mode
        return self

    def eval(self) -> Layer:
        """Evaluation mode: no dropout."""
        return self.train(False)

    def load_parameters(self, values: Mapping[str, Any]) -> None:
        """Copy ``values`` into the parameters of the same names, in place."""
        copy_into(self.parameters(), values)

    def _accumulate(self, name: str, grad: Any) -> None:
        previous = self._grads.get(name)
        self._grads[name] = grad if previous is None else previous + grad

    def _saved(self, value: Any) -> Any:
        if value is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return value


class ReLU(Layer):
    """``max(x, 0)``.

    Examples
    --------
    >>> import numpy as np
    >>> relu = ReLU()
    >>> relu.forward(np.array([-1.0, 2.0])).tolist(), relu.backward(np.array([5.0, 5.0])).tolist()
    ([0.0, 2.0], [0.0, 5.0])
    """

    def __init__(self) -> None:
        super().__init__()
        self._positive: Any = None

    def forward(self, x: Any) -> Any:
        xp = array_namespace(x)
        self._positive = x > 0
        return xp.maximum(x, xp.zeros_like(x))  # maximum, not where: NumPy's where is ~10x slower

    def backward(self, grad_y: Any, *, input_grad: bool = True) -> Any:
        positive = self._saved(self._positive)
        if not input_grad:
            return None
        xp = array_namespace(grad_y)
        return grad_y * xp.astype(positive, grad_y.dtype)


class Linear(Layer):
    """A dense layer ``x W^T + b``; ``weight`` and ``bias`` are trained unless ``trainable=False``.

    Parameters
    ----------
    weight : array, shape (out, in)
        Or (in, out) with ``fan_in_fan_out``. Copied when trainable.
    bias : array, shape (out,), optional
    trainable : bool
        Expose ``weight`` and ``bias`` as parameters and compute their gradients.
    fan_in_fan_out : bool
        The weight is stored transposed (transformers' ``Conv1D``).

    Examples
    --------
    >>> import numpy as np
    >>> layer = Linear(np.ones((3, 2)), np.zeros(3))
    >>> layer.forward(np.ones((4, 2))).shape
    (4, 3)
    >>> layer.backward(np.ones((4, 3))).shape, layer.grads()["weight"].shape
    ((4, 2), (3, 2))
    """

    def __init__(self, weight: Any, bias: Any = None, *, trainable: bool = True, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        xp = array_namespace(weight)
        self.out_features, self.in_features = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
        self.fan_in_fan_out = fan_in_fan_out
        self.trainable = trainable
        self.weight = _copy(xp, weight) if trainable else weight
        self.bias = _copy(xp, bias) if trainable and bias is not None else bias
        if trainable:
            self._params["weight"] = self.weight
            if bias is not None:
                self._params["bias"] = self.bias
        self._x: Any = None

    def forward(self, x: Any) -> Any:
        self._x = x
        return vc.linear(x, self.weight, self.bias, fan_in_fan_out=self.fan_in_fan_out)

    def backward(self, grad_y: Any, *, input_grad: bool = True) -> Any:
        x = self._saved(self._x)
        if self.trainable:
            xp = array_namespace(grad_y, x)
            grad_w = xp.astype(xp.matmul(_flat(xp, grad_y).T, _flat(xp, x)), self.weight.dtype)
            self._accumulate("weight", grad_w.T if self.fan_in_fan_out else grad_w)
            if self.bias is not None:
                self._accumulate("bias", _token_sum(xp, grad_y, self.bias.dtype))
        if not input_grad:
            return None
        return vc.linear_input_grad(grad_y, self.weight, fan_in_fan_out=self.fan_in_fan_out)


class AdaptedLinear(Layer):
    """Base of :class:`VeraLinear` and :class:`DVoraLinear`: frozen weight, projections, vectors, dropout, bias.

    Attributes ``weight``, ``bias``, ``A``, ``B``, ``rank``, ``in_features``,
    ``out_features``, ``fan_in_fan_out``, ``train_bias``, ``lambda_d``, ``lambda_b``.
    """

    def __init__(
        self,
        weight: Any,
        A: Any,
        B: Any,
        *,
        bias: Any = None,
        rank: int | None = None,
        d_initial: float = 0.1,
        train_bias: bool = False,
        fan_in_fan_out: bool = False,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        xp = array_namespace(weight, A, B)
        if weight.ndim != 2:
            raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        if train_bias and bias is None:
            raise ValueError("train_bias=True but the layer has no bias")
        self.xp = xp
        self.device = device_of(weight)
        self.out_features, self.in_features = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
        self.rank = A.shape[0] if rank is None else rank
        if not isinstance(self.rank, int) or not 1 <= self.rank <= A.shape[0]:
            raise ValueError(f"rank must be an int in [1, {A.shape[0]}] (the shared rank), got {self.rank!r}")
        self.weight, self.A, self.B = weight, A, B
        self.fan_in_fan_out = fan_in_fan_out
        self.dropout, self.seed, self._draws = dropout, seed, 0
        self.vector_dtype = vector_dtype(xp, weight.dtype)
        self.train_bias = train_bias
        self.bias = _copy(xp, bias, self.vector_dtype) if train_bias else bias
        self._params["lambda_d"] = xp.full(self.rank, d_initial, dtype=self.vector_dtype, device=self.device)
        self._params["lambda_b"] = xp.zeros(self.out_features, dtype=self.vector_dtype, device=self.device)
        if train_bias:
            self._params["bias"] = self.bias
        self._mask: Any = None
        self._passes: vc.MergedPasses | None = None  # the last forward's passes on the weight (None: with dropout)

    @property
    def lambda_d(self) -> Any:
        """The trainable rank scaling, shape (rank,)."""
        return self._params["lambda_d"]

    @property
    def lambda_b(self) -> Any:
        """The trainable output scaling, shape (out,)."""
        return self._params["lambda_b"]

    def _dropout_mask(self, x: Any) -> Any:
        """Inverted-dropout mask for ``x`` (None when off): :func:`dropout_mask`, draw ``k`` of this layer's stream."""
        if not self.training or self.dropout == 0.0 or x.ndim == 0:
            return None
        self._draws += 1
        return dropout_mask(self.xp, x, self.dropout, self.seed * 2**32 + self._draws - 1)

    def _passes_for(self, x: Any) -> vc.MergedPasses | None:
        """Without dropout: the whole layer from its weight, each pass merged where cheaper; None with dropout."""
        if self._mask is not None:
            return None
        tokens = math.prod(x.shape[:-1])
        return vc.merged_passes(tokens, self.in_features, self.out_features, self.lambda_d.shape[0])

    def _base_input_grad(self, grad_base: Any, adapter_grad_x: Any) -> Any:
        return vc.linear_input_grad(grad_base, self.weight, fan_in_fan_out=self.fan_in_fan_out) + adapter_grad_x


class VeraLinear(AdaptedLinear):
    """A frozen dense layer plus a VeRA adapter: ``x W^T + bias + lambda_b * (B (lambda_d * (A x)))``.

    Parameters
    ----------
    weight : array, shape (out, in)
        The frozen weight, or (in, out) with ``fan_in_fan_out``. Never modified.
    A, B : array
        The shared projections (R x max_in) and (max_out x R), e.g. from
        :func:`vera_core.generate_projections`.
    bias : array, shape (out,), optional
        Frozen unless ``train_bias``.
    rank : int, optional
        This layer's rank ``r <= R``; default R.
    d_initial : float
        Initial value of ``lambda_d`` (``lambda_b`` starts at 0: the layer starts unchanged).
    train_bias : bool
        Train a copy of the bias as well (parameter ``"bias"``).
    fan_in_fan_out : bool
        The weight is stored transposed.
    dropout : float
        Dropout probability on the adapter path's input, in training mode.
    seed : int
        Dropout stream of this layer, in ``[0, 2**32)``.

    Examples
    --------
    >>> import numpy as np
    >>> import vera_core as vc
    >>> A, B = vc.generate_projections(0, r=4, max_in=8, max_out=6, xp=np)
    >>> layer = VeraLinear(np.ones((6, 8), np.float32), A, B)
    >>> y = layer.forward(np.ones((2, 8), np.float32))
    >>> dx = layer.backward(np.ones((2, 6), np.float32))
    >>> sorted(layer.grads()), dx.shape
    (['lambda_b', 'lambda_d'], (2, 8))
    """

    _u: Any = None  # u = x A_s^T from the last forward

    def forward(self, x: Any) -> Any:
        self._mask = self._dropout_mask(x)
        self._passes = self._passes_for(x)
        if self._passes is not None:
            y, self._u = vc.vera_forward_dense(
                x,
                self.weight,
                self.A,
                self.B,
                self.lambda_d,
                self.lambda_b,
                bias=self.bias,
                fan_in_fan_out=self.fan_in_fan_out,
                merged=self._passes.forward,
            )
            return y
        base = vc.linear(x, self.weight, self.bias, fan_in_fan_out=self.fan_in_fan_out)
        y, self._u = vc.vera_forward(
            x, self.A, self.B, self.lambda_d, self.lambda_b, base=base, dropout_mask=self._mask
        )
        return y

    def backward(self, grad_y: Any, *, input_grad: bool = True) -> Any:
        u = self._saved(self._u)
        if self._passes is not None:
            grads = vc.vera_backward_dense(
                grad_y,
                u,
                self.weight,
                self.A,
                self.B,
                self.lambda_d,
                self.lambda_b,
                fan_in_fan_out=self.fan_in_fan_out,
                input_grad=input_grad,
                merged=self._passes.backward,
            )
        else:
            grads = vc.vera_backward(
                grad_y,
                u,
                self.A,
                self.B,
                self.lambda_d,
                self.lambda_b,
                in_features=self.in_features,
                dropout_mask=self._mask,
                input_grad=input_grad,
            )
        self._accumulate("lambda_d", grads.lambda_d)
        self._accumulate("lambda_b", grads.lambda_b)
        if self.train_bias:
            self._accumulate("bias", _token_sum(self.xp, grad_y, self.vector_dtype))
        if not input_grad:
            return None
        return grads.x if self._passes is not None else self._base_input_grad(grad_y, grads.x)


class DVoraLinear(AdaptedLinear):
    """A frozen dense layer with a DVoRA adapter: ``(m / ||W0 + dW||) * x (W0 + dW)^T + bias``.

    Parameters are those of :class:`VeraLinear`, plus the trainable ``"magnitude"``
    (shape (out,), initialised to the row norms of ``weight``) and:

    detach_norm : bool
        Treat the norm as a constant in backward (DoRA section 4.3).

    Examples
    --------
    >>> import numpy as np
    >>> import vera_core as vc
    >>> A, B = vc.generate_projections(0, r=4, max_in=8, max_out=6, xp=np)
    >>> W = np.ones((6, 8), np.float32)
    >>> layer = DVoraLinear(W, A, B, bias=np.zeros(6, np.float32))
    >>> x = np.ones((2, 8), np.float32)
    >>> bool(np.allclose(layer.forward(x), x @ W.T))
    True
    >>> _ = layer.backward(np.ones((2, 6), np.float32))
    >>> sorted(layer.grads())
    ['lambda_b', 'lambda_d', 'magnitude']
    """

    def __init__(
        self,
        weight: Any,
        A: Any,
        B: Any,
        *,
        bias: Any = None,
        rank: int | None = None,
        d_initial: float = 0.1,
        train_bias: bool = False,
        fan_in_fan_out: bool = False,
        dropout: float = 0.0,
        seed: int = 0,
        detach_norm: bool = False,
    ) -> None:
        super().__init__(
            weight,
            A,
            B,
            bias=bias,
            rank=rank,
            d_initial=d_initial,
            train_bias=train_bias,
            fan_in_fan_out=fan_in_fan_out,
            dropout=dropout,
            seed=seed,
        )
        self.detach_norm = detach_norm
        self.frozen = vc.dvora_precompute(weight, A, self.rank, fan_in_fan_out=fan_in_fan_out)
        self._params["magnitude"] = vc.initial_magnitude(weight, fan_in_fan_out=fan_in_fan_out, dtype=self.vector_dtype)
        self._state: Any = None

    @property
    def magnitude(self) -> Any:
        """The trainable magnitude, shape (out,)."""
        return self._params["magnitude"]

    def forward(self, x: Any) -> Any:
        self._mask = self._dropout_mask(x)
        self._passes = self._passes_for(x)
        if self._passes is not None:
            y, self._state = vc.dvora_forward_dense(
                x,
                self.weight,
                self.frozen,
                self.A,
                self.B,
                self.magnitude,
                self.lambda_d,
                self.lambda_b,
                bias=self.bias,
                fan_in_fan_out=self.fan_in_fan_out,
                merged=self._passes.forward,
            )
            return y
        base = vc.linear(x, self.weight, fan_in_fan_out=self.fan_in_fan_out)
        y, self._state = vc.dvora_forward(
            x,
            base,
            self.frozen,
            self.A,
            self.B,
            self.magnitude,
            self.lambda_d,
            self.lambda_b,
            bias=self.bias,
            dropout_mask=self._mask,
        )
        return y

    def backward(self, grad_y: Any, *, input_grad: bool = True) -> Any:
        saved = self._saved(self._state)
        if self._passes is not None:
            grads = vc.dvora_backward_dense(
                grad_y,
                saved,
                self.frozen,
                self.weight,
                self.A,
                self.B,
                self.magnitude,
                self.lambda_d,
                self.lambda_b,
                fan_in_fan_out=self.fan_in_fan_out,
                detach_norm=self.detach_norm,
                has_bias=self.train_bias,
                input_grad=input_grad,
                merged=self._passes.backward,
            )
        else:
            grads = vc.dvora_backward(
                grad_y,
                saved,
                self.frozen,
                self.A,
                self.B,
                self.magnitude,
                self.lambda_d,
                self.lambda_b,
                in_features=self.in_features,
                detach_norm=self.detach_norm,
                has_bias=self.train_bias,
                dropout_mask=self._mask,
                input_grad=input_grad,
            )
        self._accumulate("lambda_d", grads.lambda_d)
        self._accumulate("lambda_b", grads.lambda_b)
        self._accumulate("magnitude", grads.magnitude)
        if self.train_bias:
            self._accumulate("bias", grads.bias)
        if not input_grad:
            return None
        return grads.x if self._passes is not None else self._base_input_grad(grads.base, grads.x)
