"""Optimisers (SGD with momentum, AdamW) and gradient clipping, in Array API operations.

Optimisers hold the parameter arrays by name (e.g. ``model.parameters()``) and update
them *in place* (``p[...] = new``), so the layers holding them see the new values;
``step(grads)`` takes the gradients by the same names (e.g. ``model.grads()``).
All state stays on the parameters' device; the formulas follow ``torch.optim``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

import vera_core as vc
from vera_numpy.bank import RowGrad, put_rows


class Optimizer:
    """Base class: named parameters, a learning rate, per-parameter state, state dicts."""

    hyperparameters: tuple[str, ...] = ("lr",)

    def __init__(self, params: Mapping[str, Any], lr: float) -> None:
        if not params:
            raise ValueError("the optimiser got no parameters")
        if lr < 0:
            raise ValueError(f"lr must be non-negative, got {lr!r}")
        self.params: dict[str, Any] = dict(params)
        self.lr = float(lr)
        self.state: dict[str, dict[str, Any]] = {}

    def step(self, grads: Mapping[str, Any]) -> None:
        """Update every parameter that has a gradient in ``grads`` (others are left alone)."""
        unknown = sorted(set(grads) - set(self.params))
        if unknown:
            raise KeyError(f"gradients for unknown parameters: {', '.join(unknown)}")
        for name, grad in grads.items():
            param = self.params[name]
            if tuple(grad.shape) != tuple(param.shape):
                raise ValueError(f"gradient {name!r} has shape {tuple(grad.shape)}, parameter {tuple(param.shape)}")
            xp = array_namespace(param, grad)
            param[...] = self._update(xp, self.state.setdefault(name, {}), param, xp.astype(grad, param.dtype))

    def _update(self, xp: Any, state: dict[str, Any], param: Any, grad: Any) -> Any:
        """The parameter's new value; may create or replace entries of ``state``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters and a copy of the per-parameter state (arrays stay on their device)."""
        state = {
            name: {
                key: value if isinstance(value, int) else array_namespace(value).asarray(value, copy=True)
                for key, value in entries.items()
            }
            for name, entries in self.state.items()
        }
        return {**{key: getattr(self, key) for key in self.hyperparameters}, "state": state}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (for the same parameter names)."""
        unknown = sorted(set(state_dict["state"]) - set(self.params))
        if unknown:
            raise KeyError(f"state for unknown parameters: {', '.join(unknown)}")
        for key in self.hyperparameters:
            setattr(self, key, state_dict[key])
        self.state = {name: dict(entries) for name, entries in state_dict["state"].items()}


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov and L2 weight decay.

    As ``torch.optim.SGD``: ``g += wd * p``; ``buf = g`` on the first step, then
    ``buf = momentum * buf + (1 - dampening) * g``; the step uses ``g + momentum * buf``
    (Nesterov) or ``buf``; ``p -= lr * step``.

    Examples
    --------
    >>> import numpy as np
    >>> p = {"w": np.array([1.0, 2.0])}
    >>> opt = SGD(p, lr=0.1, momentum=0.9)
    >>> opt.step({"w": np.array([1.0, 1.0])}); opt.step({"w": np.array([1.0, 1.0])})
    >>> p["w"].tolist()
    [0.71, 1.71]
    """

    hyperparameters = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def __init__(
        self,
        params: Mapping[str, Any],
        lr: float,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        super().__init__(params, lr)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening 0")
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.weight_decay, self.nesterov = float(weight_decay), nesterov

    def _update(self, xp: Any, state: dict[str, Any], param: Any, grad: Any) -> Any:
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        if self.momentum:
            buf = state.get("momentum_buffer")
            buf = xp.asarray(grad, copy=True) if buf is None else self.momentum * buf + (1.0 - self.dampening) * grad
            state["momentum_buffer"] = buf
            grad = grad + self.momentum * buf if self.nesterov else buf
        return param - self.lr * grad


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov and Hutter), as ``torch.optim.AdamW``.

    ``p *= 1 - lr * wd``; ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
    ``p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

    Examples
    --------
    >>> import numpy as np
    >>> p = {"w": np.array([1.0, -1.0])}
    >>> opt = AdamW(p, lr=0.1, weight_decay=0.0)
    >>> opt.step({"w": np.array([3.0, -0.5])})
    >>> np.round(p["w"], 6).tolist()
    [0.9, -0.9]
    """

    hyperparameters = ("lr", "betas", "eps", "weight_decay")

    def __init__(
        self,
        params: Mapping[str, Any],
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr)
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps, self.weight_decay = float(eps), float(weight_decay)

    def _update(self, xp: Any, state: dict[str, Any], param: Any, grad: Any) -> Any:
        beta1, beta2 = self.betas
        if not state:
            state.update(step=0, exp_avg=xp.zeros_like(param), exp_avg_sq=xp.zeros_like(param))
        state["step"] += 1
        step = state["step"]
        new, state["exp_avg"], state["exp_avg_sq"] = adamw_update(
            xp,
            param,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            self.lr / (1.0 - beta1**step),
            math.sqrt(1.0 - beta2**step),
            self,
        )
        return new


def adamw_update(
    xp: Any, param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any, step_size: Any, correction: Any, hyper: Any
) -> tuple[Any, Any, Any]:
    """One AdamW update: ``(new param, exp_avg, exp_avg_sq)``, the formulas of :class:`AdamW`.

    ``step_size`` is ``lr / (1 - beta1^t)`` and ``correction`` is ``sqrt(1 - beta2^t)``:
    numbers, or columns (k, 1) of per-row values (:class:`BankAdamW`, each row its own
    ``t``). ``hyper`` has ``lr``, ``betas``, ``eps`` and ``weight_decay``.
    """
    beta1, beta2 = hyper.betas
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * (grad * grad)
    denom = xp.sqrt(exp_avg_sq) / correction + hyper.eps
    decayed = param * (1.0 - hyper.lr * hyper.weight_decay)
    return decayed - step_size * exp_avg / denom, exp_avg, exp_avg_sq


class BankAdamW:
    """AdamW over a :class:`~vera_numpy.BankModel`, one adapter (row) at a time.

    A bank parameter stacks many adapters' vectors, one per row; its gradient
    (:class:`~vera_numpy.bank.RowGrad`) holds the rows a step used. The moments and the
    step count are kept per row, and only those rows are decayed and moved: each adapter
    gets what :class:`AdamW` gives it when trained alone on its own rows. The state
    follows the bank as it grows; an adapter added into a freed row starts with fresh
    state. The formulas are :class:`AdamW`'s (:func:`adamw_update`).

    Parameters
    ----------
    model : BankModel
        Its ``parameters()`` are looked up at every step (banks are replaced as they grow).
    lr, betas, eps, weight_decay
        As :class:`AdamW`.

    Examples
    --------
    >>> import numpy as np
    >>> import vera_numpy as vn
    >>> model = vn.BankModel({"fc.weight": np.ones((3, 4), np.float32)})
    >>> model.add_vera("a", ["fc"], r=2); model.add_vera("b", ["fc"], r=2)
    >>> opt = BankAdamW(model, lr=0.1)
    >>> model.use(["a", "a"])
    >>> _ = model.layer("fc").forward(np.ones((2, 4), np.float32))
    >>> _ = model.layer("fc").backward(np.ones((2, 3), np.float32))
    >>> opt.step()  # moves adapter a's rows only
    >>> model.vectors("b")["fc.lambda_d"].tolist()
    [0.10000000149011612, 0.10000000149011612]
    """

    hyperparameters = ("lr", "betas", "eps", "weight_decay")

    def __init__(
        self,
        model: Any,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr!r}, {eps!r}, {weight_decay!r}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        self.model = model
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.state: dict[str, dict[str, Any]] = {}
        model.on_new_row(self._forget_row)

    def _forget_row(self, slot: int) -> None:
        """Row ``slot`` holds a new adapter: its moments and step count start again."""
        for state in self.state.values():
            if slot < state["step"].shape[0]:
                for value in state.values():
                    value[slot, ...] = 0.0

    def _state(self, xp: Any, name: str, param: Any) -> dict[str, Any]:
        state = self.state.get(name)
        shape = tuple(param.shape)
        if state is not None and any(a < b for a, b in zip(shape, state["exp_avg"].shape, strict=True)):
            state = None  # a bank of this name was deleted and made again, smaller
        if state is None:
            state = self.state[name] = {
                "exp_avg": xp.zeros_like(param),
                "exp_avg_sq": xp.zeros_like(param),
                "step": xp.zeros(shape[0], dtype=xp.float64, device=device_of(param)),
            }
        elif tuple(state["exp_avg"].shape) != shape:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = vc.grown(state[key], shape)
            state["step"] = vc.grown(state["step"], shape[:1])
        return state

    def step(self, grads: Mapping[str, Any] | None = None) -> None:
        """One AdamW update of the rows each gradient holds (default: the model's ``grads()``)."""
        params = self.model.parameters()
        grads = self.model.grads() if grads is None else grads
        unknown = sorted(set(grads) - set(params))
        if unknown:
            raise KeyError(f"gradients for unknown parameters: {', '.join(unknown)}")
        for name, grad in grads.items():
            if not isinstance(grad, RowGrad):
                raise TypeError(f"BankAdamW takes the RowGrad gradients of a bank; {name!r} has {type(grad).__name__}")
            grad = grad.coalesced()
            param = params[name]
            if grad.values.shape[1:] != param.shape[1:]:
                raise ValueError(
                    f"gradient {name!r} has rows of shape {grad.values.shape[1:]}, parameter {param.shape[1:]}"
                )
            if grad.rows.shape[0]:
                self._update_rows(name, param, grad)

    def _update_rows(self, name: str, param: Any, grad: RowGrad) -> None:
        xp = array_namespace(param, grad.values)
        state = self._state(xp, name, param)
        rows = grad.rows
        beta1, beta2 = self.betas
        step = xp.take(state["step"], rows, axis=0) + 1.0
        put_rows(state["step"], rows, step)
        step_size = xp.astype(self.lr / (1.0 - beta1**step), param.dtype)[:, None]
        correction = xp.astype(xp.sqrt(1.0 - beta2**step), param.dtype)[:, None]
        new, exp_avg, exp_avg_sq = adamw_update(
            xp,
            xp.take(param, rows, axis=0),
            xp.astype(grad.values, param.dtype),
            xp.take(state["exp_avg"], rows, axis=0),
            xp.take(state["exp_avg_sq"], rows, axis=0),
            step_size,
            correction,
            self,
        )
        put_rows(param, rows, new)
        put_rows(state["exp_avg"], rows, exp_avg)
        put_rows(state["exp_avg_sq"], rows, exp_avg_sq)


def clip_grad_norm(grads: Mapping[str, Any], max_norm: float, *, eps: float = 1e-6) -> Any:
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``: the factor is ``min(1, max_norm / (norm + eps))``,
    computed on the device (no host synchronisation).

    Returns
    -------
    array, shape ()
        The norm before clipping, in float32 or the widest gradient dtype.

    Examples
    --------
    >>> import numpy as np
    >>> g = {"a": np.array([3.0]), "b": np.array([4.0])}
    >>> float(clip_grad_norm(g, 1.0)), round(float(g["a"][0]), 4), round(float(g["b"][0]), 4)
    (5.0, 0.6, 0.8)
    """
    if not grads:
        raise ValueError("clip_grad_norm got no gradients")
    # a RowGrad's norm is its summed rows'; scaling its values scales their sums alike
    arrays = [grad.coalesced().values if isinstance(grad, RowGrad) else grad for grad in grads.values()]
    targets = [grad.values if isinstance(grad, RowGrad) else grad for grad in grads.values()]
    xp = array_namespace(*arrays)
    widest = max((g.dtype for g in arrays), key=lambda dtype: int(xp.finfo(dtype).bits))
    work = xp.float32 if int(xp.finfo(widest).bits) < 32 else widest
    squares = [xp.sum(xp.astype(g, work) * xp.astype(g, work)) for g in arrays]
    total = xp.sqrt(sum(squares[1:], squares[0]))
    factor = xp.minimum(max_norm / (total + eps), 1.0)  # not clip: CuPy's compat clip syncs (boolean masks)
    for g in targets:
        g[...] = g * xp.astype(factor, g.dtype)
    return total
