"""Conformance checks of VeRA and DVoRA against the pure-Python oracle, on any namespace."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from array_api_compat import device as device_of

import vera_core as vc
from vera_core.testing import reference as ref
from vera_core.testing._values import assert_close, to_nested
from vera_core.testing.cases import DEFAULT_CASE, Case, Layer

_LABELS = {"x": "dL/dx", "d": "dL/dlambda_d", "b": "dL/dlambda_b", "m": "dL/dmagnitude", "bias": "dL/dbias"}


def _expect(layer: Layer, what: str, array: Any, shape: tuple[int, ...], dtype: str) -> None:
    """Raise AssertionError unless ``array`` has this shape and dtype and lives on the layer's device."""
    xp = layer.xp
    if tuple(array.shape) != shape:
        raise AssertionError(f"{what}: shape {tuple(array.shape)}, expected {shape}")
    if array.dtype != getattr(xp, dtype):
        raise AssertionError(f"{what}: dtype {array.dtype}, expected {dtype}")
    if layer.device is not None and device_of(array) != layer.device:
        raise AssertionError(f"{what}: on device {device_of(array)}, expected {layer.device}")


def compare_grads(
    layer: Layer, method: str, actual: dict[str, Any], expected: dict[str, Any], tolerance: dict[str, Any], label: str
) -> None:
    """Raise AssertionError unless each gradient array in ``actual`` is within ``tolerance`` of ``expected``.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> layer = Layer.build(DEFAULT_CASE, xp, dtype="float64")
    >>> expected, tolerance = layer.finite_difference_grads("vera")
    >>> compare_grads(layer, "vera", adapter_grads(layer, "vera"), expected, tolerance, "central differences")
    """
    for name, value in actual.items():
        values = layer.rows(value) if name == "x" else to_nested(value)
        assert_close(f"{method} {_LABELS[name]} ({label})", values, expected[name], tolerance[name])


def adapter_grads(layer: Layer, method: str, *, detach_norm: bool = False) -> dict[str, Any]:
    """The gradients the core's backward gives, keyed as :meth:`Layer.grad_names` (``x`` in full).

    ``dL/dx`` adds the frozen layer's share (:func:`vera_core.linear_input_grad`) to the adapter's.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> grads = adapter_grads(Layer.build(DEFAULT_CASE, xp), "dvora")
    >>> sorted(grads), grads["x"].shape
    (['b', 'd', 'm', 'x'], (2, 3, 5))
    """
    a, c = layer.arrays, layer.case
    if method == "vera":
        _, u = _vera_outputs(layer)
        vera = vc.vera_backward(
            a["grad"], u, a["A"], a["B"], a["d"], a["b"], in_features=c.in_features, dropout_mask=a.get("mask")
        )
        grad_x, frozen_share = vera.x, vc.linear_input_grad(a["grad"], a["weight"], fan_in_fan_out=c.fan_in_fan_out)
        result = {"d": vera.lambda_d, "b": vera.lambda_b}
    else:
        frozen, _ = _dvora_setup(layer)
        _, saved = _dvora_outputs(layer)
        dvora = vc.dvora_backward(
            a["grad"], saved, frozen, a["A"], a["B"], a["m"], a["d"], a["b"], in_features=c.in_features,
            detach_norm=detach_norm, has_bias=c.bias, dropout_mask=a.get("mask"),
        )  # fmt: skip
        grad_x, frozen_share = dvora.x, vc.linear_input_grad(dvora.base, a["weight"], fan_in_fan_out=c.fan_in_fan_out)
        result = {"d": dvora.lambda_d, "b": dvora.lambda_b, "m": dvora.magnitude}
        if c.bias:
            result["bias"] = dvora.bias
    for name, value in result.items():
        _expect(layer, _LABELS[name], value, (len(layer.values[name]),), layer.vector_dtype)
    return {"x": grad_x + frozen_share, **result}


def _vera_outputs(layer: Layer, *, dropout: bool = True) -> tuple[Any, Any]:
    a, c = layer.arrays, layer.case
    base = vc.linear(a["x"], a["weight"], a.get("bias"), fan_in_fan_out=c.fan_in_fan_out)
    mask = a.get("mask") if dropout else None
    return vc.vera_forward(a["x"], a["A"], a["B"], a["d"], a["b"], base=base, dropout_mask=mask)


def check_vera_forward(xp: Any, device: Any = None, *, case: Case = DEFAULT_CASE, dtype: str = "float32") -> None:
    """:func:`vera_core.vera_forward` agrees with the float64 oracle within rounding error.

    Parameters
    ----------
    xp : namespace
        The Array API namespace under test.
    device : device, optional
        Where to put the arrays; default the namespace's default device.
    case : Case
        Sizes and options of the layer.
    dtype : str
        Name of the activations' dtype; the vectors are float32 beside 16-bit activations.

    Raises
    ------
    AssertionError
        Naming the first output, shape, dtype or device that is wrong.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> check_vera_forward(xp, case=Case(batch=(4,)), dtype="float64")
    """
    layer = Layer.build(case, xp, device, dtype)
    y, u = _vera_outputs(layer)
    _expect(layer, "vera_forward y", y, (*case.batch, case.out_features), dtype)
    _expect(layer, "vera_forward u", u, (*case.batch, case.rank), dtype)
    assert_close("vera_forward y", layer.rows(y), layer.reference("vera"), layer.tolerance(layer.output_bound("vera")))


def check_vera_backward(xp: Any, device: Any = None, *, case: Case = DEFAULT_CASE, dtype: str = "float32") -> None:
    """:func:`vera_core.vera_backward` agrees with central differences of the oracle.

    ``dL/dx`` is checked in full: the adapter's share plus :func:`vera_core.linear_input_grad`.
    Parameters and exceptions as in :func:`check_vera_forward`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> check_vera_backward(xp, dtype="float64")
    """
    layer = Layer.build(case, xp, device, dtype)
    expected, tolerance = layer.finite_difference_grads("vera")
    compare_grads(layer, "vera", adapter_grads(layer, "vera"), expected, tolerance, "central differences")


def check_vera_merge(xp: Any, device: Any = None, *, case: Case = DEFAULT_CASE, dtype: str = "float32") -> None:
    """:func:`vera_core.delta_weight`, :func:`vera_core.merge` and :func:`vera_core.unmerge` in both layouts.

    The merged weight is ``W0 + dW``; unmerging restores ``W0``; and the merged layer
    computes what :func:`vera_core.vera_forward` computes (without dropout). Parameters
    and exceptions as in :func:`check_vera_forward`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> check_vera_merge(xp, case=Case(fan_in_fan_out=True))
    """
    layer = Layer.build(case, xp, device, dtype)
    a, v, c = layer.arrays, layer.values, case
    adapter = (a["A"], a["B"], a["d"], a["b"])
    magnitudes = layer.absolute_values()
    delta = vc.delta_weight(*adapter, c.in_features, fan_in_fan_out=c.fan_in_fan_out)
    dW_bound = ref.delta_weight(magnitudes["A"], magnitudes["B"], magnitudes["d"], magnitudes["b"], c.in_features)
    assert_close(
        "delta_weight",
        layer.weight_values(delta),
        ref.delta_weight(v["A"], v["B"], v["d"], v["b"], c.in_features),
        layer.tolerance(dW_bound),
    )
    merged = vc.merge(a["weight"], *adapter, fan_in_fan_out=c.fan_in_fan_out, safe=True)
    _expect(layer, "merge", merged, tuple(a["weight"].shape), dtype)
    weight_bound = ref.adapted_weight(
        magnitudes["W"], magnitudes["A"], magnitudes["B"], magnitudes["d"], magnitudes["b"]
    )
    adapted = ref.adapted_weight(v["W"], v["A"], v["B"], v["d"], v["b"])
    assert_close("merge", layer.weight_values(merged), adapted, layer.tolerance(weight_bound))
    restored = vc.unmerge(merged, *adapter, fan_in_fan_out=c.fan_in_fan_out)
    assert_close(
        "unmerge(merge(W))", layer.weight_values(restored), v["W"], layer.tolerance(weight_bound, computations=2)
    )
    _check_merged_output(layer, "vera", merged, _vera_outputs(layer, dropout=False)[0])


def _check_merged_output(layer: Layer, method: str, merged: Any, y: Any) -> None:
    """``x W'^T + bias`` equals the adapted forward ``y`` (computed without dropout).

    Each side is within the rounding bound of the exact output: they differ by at most twice it.
    """
    a, c = layer.arrays, layer.case
    y_merged = vc.linear(a["x"], merged, a.get("bias"), fan_in_fan_out=c.fan_in_fan_out)
    bound = layer.with_values(mask=None).output_bound(method)
    tolerance = layer.tolerance(bound, computations=2)
    assert_close(f"{method}: merged layer vs forward", layer.rows(y_merged), layer.rows(y), tolerance)


def _dvora_setup(layer: Layer) -> tuple[Any, Any]:
    """The frozen precomputation and the base output ``x W0^T`` (no bias) of a layer."""
    a, c = layer.arrays, layer.case
    frozen = vc.dvora_precompute(a["weight"], a["A"], c.rank, fan_in_fan_out=c.fan_in_fan_out)
    return frozen, vc.linear(a["x"], a["weight"], fan_in_fan_out=c.fan_in_fan_out)


def _dvora_outputs(layer: Layer, *, dropout: bool = True, **overrides: Any) -> tuple[Any, Any]:
    a = {**layer.arrays, **overrides}
    frozen, base = _dvora_setup(layer)
    mask = a.get("mask") if dropout else None
    return vc.dvora_forward(
        a["x"], base, frozen, a["A"], a["B"], a["m"], a["d"], a["b"], bias=a.get("bias"), dropout_mask=mask
    )


def check_dvora_norm(xp: Any, device: Any = None, *, case: Case = DEFAULT_CASE, dtype: str = "float32") -> None:
    """The Gram-form :func:`vera_core.dvora_norm` and :func:`vera_core.dense_norm` both equal ``||W0 + dW||``.

    Parameters and exceptions as in :func:`check_vera_forward`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> check_dvora_norm(xp, dtype="float64")
    """
    layer = Layer.build(case, xp, device, dtype)
    a, c = layer.arrays, case
    frozen, _ = _dvora_setup(layer)
    n = layer.norm()
    tolerance = layer.tolerance([t * c for t, c in zip(n, layer.norm_conditions(), strict=True)])
    gram = vc.dvora_norm(frozen, a["B"], a["d"], a["b"])
    dense = vc.dense_norm(a["weight"], a["A"], a["B"], a["d"], a["b"], fan_in_fan_out=c.fan_in_fan_out)
    assert_close("dvora_norm (Gram form)", to_nested(gram), n, tolerance)
    assert_close("dense_norm", to_nested(dense), n, tolerance)


def check_dvora_forward(xp: Any, device: Any = None, *, case: Case = DEFAULT_CASE, dtype: str = "float32") -> None:
    """:func:`vera_core.dvora_forward` agrees with the oracle, and the initial magnitude changes nothing.

    With ``m = initial_magnitude(W0)`` and ``lambda_b = 0`` the output is the frozen
    layer's. Parameters and exceptions as in :func:`check_vera_forward`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> check_dvora_forward(xp, case=Case(bias=True))
    """
    layer = Layer.build(case, xp, device, dtype)
    a, v, c = layer.arrays, layer.values, case
    y, _ = _dvora_outputs(layer)
    _expect(layer, "dvora_forward y", y, (*c.batch, c.out_features), dtype)
    assert_close(
        "dvora_forward y", layer.rows(y), layer.reference("dvora"), layer.tolerance(layer.output_bound("dvora"))
    )
    magnitude = vc.initial_magnitude(
        a["weight"], fan_in_fan_out=c.fan_in_fan_out, dtype=getattr(xp, layer.vector_dtype)
    )
    _expect(layer, "initial_magnitude", magnitude, (c.out_features,), layer.vector_dtype)
    unchanged = layer.with_values(b=[0.0] * c.out_features)
    y0, _ = _dvora_outputs(unchanged, m=magnitude)
    magnitudes = layer.absolute_values()
    bound = ref.linear(magnitudes["x"], magnitudes["W"], magnitudes.get("bias"))
    assert_close(
        "dvora_forward at the initial magnitude",
        layer.rows(y0),
        ref.linear(v["x"], v["W"], v.get("bias")),
        layer.tolerance(bound),
    )


def check_dvora_backward(
    xp: Any, device: Any = None, *, case: Case = DEFAULT_CASE, dtype: str = "float32", detach_norm: bool = False
) -> None:
    """:func:`vera_core.dvora_backward` agrees with central differences of the oracle.

    With ``detach_norm`` the differences are of the loss with ``n`` held constant. ``dL/dx``
    is checked in full (the adapter's share plus ``grads.base`` through the frozen weight).
    Other parameters and exceptions as in :func:`check_vera_forward`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> check_dvora_backward(xp, dtype="float64", detach_norm=True)
    """
    layer = Layer.build(case, xp, device, dtype)
    expected, tolerance = layer.finite_difference_grads("dvora", detach_norm=detach_norm)
    actual = adapter_grads(layer, "dvora", detach_norm=detach_norm)
    label = "central differences" + (", norm held" if detach_norm else "")
    compare_grads(layer, "dvora", actual, expected, tolerance, label)


def check_dvora_merge(xp: Any, device: Any = None, *, case: Case = DEFAULT_CASE, dtype: str = "float32") -> None:
    """:func:`vera_core.dvora_merge` gives ``m (W0 + dW) / n``; :func:`vera_core.dvora_unmerge` undoes it.

    The merged layer computes what :func:`vera_core.dvora_forward` computes (without
    dropout). Parameters and exceptions as in :func:`check_vera_forward`.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> check_dvora_merge(xp, case=Case(fan_in_fan_out=True), dtype="float64")
    """
    layer = Layer.build(case, xp, device, dtype)
    a, v, c = layer.arrays, layer.values, case
    adapter = (a["A"], a["B"], a["m"], a["d"], a["b"])
    merged, norm = vc.dvora_merge(a["weight"], *adapter, fan_in_fan_out=c.fan_in_fan_out, safe=True)
    _expect(layer, "dvora_merge", merged, tuple(a["weight"].shape), dtype)
    n, conditions = layer.norm(), layer.norm_conditions()
    assert_close(
        "dvora_merge norm", to_nested(norm), n, layer.tolerance([t * k for t, k in zip(n, conditions, strict=True)])
    )
    magnitudes = layer.absolute_values()
    V = ref.adapted_weight(*(v[k] for k in ("W", "A", "B", "d", "b")))
    V_abs = ref.adapted_weight(*(magnitudes[k] for k in ("W", "A", "B", "d", "b")))
    scaled_abs = [[w * (1.0 + k) for w in row] for k, row in zip(conditions, V_abs, strict=True)]
    expected = [[m / t * w for w in row] for m, t, row in zip(v["m"], n, V, strict=True)]
    bound = [[abs(m) / t * w for w in row] for m, t, row in zip(v["m"], n, scaled_abs, strict=True)]
    assert_close("dvora_merge", layer.weight_values(merged), expected, layer.tolerance(bound))
    restored = vc.dvora_unmerge(merged, norm, *adapter, fan_in_fan_out=c.fan_in_fan_out)
    assert_close(
        "dvora_unmerge(dvora_merge(W))",
        layer.weight_values(restored),
        v["W"],
        layer.tolerance(scaled_abs, computations=2),
    )
    _check_merged_output(layer, "dvora", merged, _dvora_outputs(layer, dropout=False)[0])


VERA_CHECKS = (check_vera_forward, check_vera_backward, check_vera_merge)
DVORA_CHECKS = (check_dvora_norm, check_dvora_forward, check_dvora_backward, check_dvora_merge)

ADAPTER_CHECKS: dict[str, Callable[..., None]] = {
    **{check.__name__.removeprefix("check_"): check for check in VERA_CHECKS + DVORA_CHECKS},
    "dvora_backward_detached": functools.partial(check_dvora_backward, detach_norm=True),
}
"""Every adapter check by name, the DVoRA backward in both modes; each takes ``(xp, device, *, case, dtype)``."""
