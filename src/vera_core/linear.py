"""The frozen base layer ``x W^T + b`` and its input gradient, for backends without autograd."""

from __future__ import annotations

from typing import Any

from vera_core import _lowrank as lr
from vera_core._validation import (
    check_activations,
    check_real_float_dtype,
    check_same_device,
    check_same_shape,
    namespace,
    optional_arrays,
    require_arrays,
    require_flags,
)


def _check_floats(xp: Any, named: dict[str, Any]) -> None:
    """TypeError unless every array given is real floating (an integer input would give integers)."""
    for name, array in named.items():
        if array is not None:
            check_real_float_dtype(xp, array.dtype, name)


def linear(x: Any, weight: Any, bias: Any = None, *, fan_in_fan_out: bool = False) -> Any:
    """``x W^T + b`` for a weight stored (out, in), or ``x W + b`` with ``fan_in_fan_out``.

    Examples
    --------
    >>> import numpy as xp
    >>> linear(xp.ones((2, 3)), xp.ones((4, 3)), xp.ones(4)).shape
    (2, 4)
    """
    require_arrays(x=x, weight=weight)
    optional_arrays(bias=bias)
    require_flags(fan_in_fan_out=fan_in_fan_out)
    xp = namespace(x, weight, *(() if bias is None else (bias,)))
    _check_floats(xp, {"x": x, "weight": weight, "bias": bias})
    out_features, in_features = lr.weight_shape(weight, fan_in_fan_out)
    check_activations("x", x, in_features, "in_features on the last axis")
    check_same_device({"x": x, "weight": weight, "bias": bias})
    if bias is not None:
        check_same_shape("bias", bias, (out_features,), "(out_features,)")
    return lr.apply_weight(xp, x, weight, bias, fan_in_fan_out)


def linear_input_grad(grad_y: Any, weight: Any, *, fan_in_fan_out: bool = False) -> Any:
    """``dL/dx = grad_y W`` of :func:`linear` (``grad_y W^T`` with ``fan_in_fan_out``).

    Examples
    --------
    >>> import numpy as xp
    >>> linear_input_grad(xp.ones((2, 4)), xp.ones((4, 3))).shape
    (2, 3)
    """
    require_arrays(grad_y=grad_y, weight=weight)
    require_flags(fan_in_fan_out=fan_in_fan_out)
    xp = namespace(grad_y, weight)
    _check_floats(xp, {"grad_y": grad_y, "weight": weight})
    out_features, _ = lr.weight_shape(weight, fan_in_fan_out)
    check_activations("grad_y", grad_y, out_features, "out_features on the last axis")
    return lr.weight_input_grad(xp, grad_y, weight, fan_in_fan_out)
