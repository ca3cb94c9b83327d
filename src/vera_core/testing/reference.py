"""Reference formulas of VeRA and DVoRA in pure Python floats (float64), written from the papers.

An oracle for the conformance checks: it imports nothing from the rest of vera-core and
works element by element on nested lists, with the adapted weight formed explicitly
(``W0 + diag(b) B diag(d) A``) and the DVoRA norm taken densely, so that it shares no
algebra with the core (which folds the vectors into a small matrix and uses the Gram form).
Matrices are lists of rows; activations are lists of token rows (leading dimensions
flattened by the caller).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

Matrix = list[list[float]]
Vector = list[float]


def delta_weight(A: Matrix, B: Matrix, d: Vector, b: Vector, in_features: int) -> Matrix:
    """``dW[o][i] = b[o] * sum_k B[o][k] d[k] A[k][i]`` (out x in), with ``r = len(d)``, ``out = len(b)``.

    Examples
    --------
    >>> delta_weight([[1.0, 2.0]], [[3.0]], [0.5], [2.0], 2)
    [[3.0, 6.0]]
    """
    return [
        [b[o] * sum(B[o][k] * d[k] * A[k][i] for k in range(len(d))) for i in range(in_features)] for o in range(len(b))
    ]


def matmul_nt(x: Matrix, W: Matrix) -> Matrix:
    """``x W^T``: each token row against each weight row.

    Examples
    --------
    >>> matmul_nt([[1.0, 2.0]], [[3.0, 4.0], [0.0, 1.0]])
    [[11.0, 2.0]]
    """
    return [[sum(xi * wi for xi, wi in zip(row, w_row, strict=True)) for w_row in W] for row in x]


def masked(x: Matrix, mask: Matrix | None) -> Matrix:
    """``x * mask`` elementwise (``x`` when there is no mask).

    Examples
    --------
    >>> masked([[1.0, 2.0]], [[0.0, 2.0]])
    [[0.0, 4.0]]
    """
    if mask is None:
        return x
    return [[xi * mi for xi, mi in zip(row, m_row, strict=True)] for row, m_row in zip(x, mask, strict=True)]


def vera_adapter(x: Matrix, A: Matrix, B: Matrix, d: Vector, b: Vector, mask: Matrix | None = None) -> Matrix:
    """The VeRA adapter term ``(x * mask) dW^T`` per token row.

    Examples
    --------
    >>> vera_adapter([[1.0, 1.0]], [[1.0, 2.0]], [[3.0]], [0.5], [2.0])
    [[9.0]]
    """
    return matmul_nt(masked(x, mask), delta_weight(A, B, d, b, len(x[0])))


def row_norms(W: Matrix) -> Vector:
    """The Euclidean norm of each row.

    Examples
    --------
    >>> row_norms([[3.0, 4.0]])
    [5.0]
    """
    return [math.sqrt(sum(w * w for w in row)) for row in W]


def adapted_weight(W: Matrix, A: Matrix, B: Matrix, d: Vector, b: Vector) -> Matrix:
    """``W0 + dW`` (out x in).

    Examples
    --------
    >>> adapted_weight([[1.0, 0.0]], [[1.0, 2.0]], [[3.0]], [0.5], [2.0])
    [[4.0, 6.0]]
    """
    dW = delta_weight(A, B, d, b, len(W[0]))
    return [[w + dw for w, dw in zip(w_row, d_row, strict=True)] for w_row, d_row in zip(W, dW, strict=True)]


def linear(x: Matrix, W: Matrix, bias: Vector | None = None) -> Matrix:
    """``x W^T + bias`` per token row.

    Examples
    --------
    >>> linear([[1.0, 2.0]], [[3.0, 4.0]], [0.5])
    [[11.5]]
    """
    y = matmul_nt(x, W)
    return y if bias is None else [[v + c for v, c in zip(row, bias, strict=True)] for row in y]


def vera_forward(
    x: Matrix,
    W: Matrix,
    A: Matrix,
    B: Matrix,
    d: Vector,
    b: Vector,
    *,
    bias: Vector | None = None,
    mask: Matrix | None = None,
) -> Matrix:
    """VeRA ``y = x W0^T + bias + (x * mask) dW^T``.

    Examples
    --------
    >>> vera_forward([[1.0, 1.0]], [[1.0, 0.0]], [[1.0, 2.0]], [[3.0]], [0.5], [2.0])
    [[10.0]]
    """
    base, adapter = linear(x, W, bias), vera_adapter(x, A, B, d, b, mask)
    return [[u + v for u, v in zip(r1, r2, strict=True)] for r1, r2 in zip(base, adapter, strict=True)]


def dvora_forward(
    x: Matrix,
    W: Matrix,
    A: Matrix,
    B: Matrix,
    m: Vector,
    d: Vector,
    b: Vector,
    *,
    bias: Vector | None = None,
    mask: Matrix | None = None,
    norm: Vector | None = None,
) -> Matrix:
    """DVoRA ``y = (m / n) * (x W0^T + (x * mask) dW^T) + bias`` with ``n = ||W0 + dW||`` per row.

    ``norm`` replaces ``n`` by a constant (the loss whose gradient the detached mode gives).

    Examples
    --------
    >>> dvora_forward([[1.0, 0.0]], [[3.0, 4.0]], [[1.0, 0.0]], [[1.0]], [5.0], [0.0], [0.0])
    [[3.0]]
    """
    n = row_norms(adapted_weight(W, A, B, d, b)) if norm is None else norm
    z = vera_forward(x, W, A, B, d, b, mask=mask)
    return [[m[o] / n[o] * row[o] + (0.0 if bias is None else bias[o]) for o in range(len(W))] for row in z]


def weighted_sum(grad: Matrix, y: Matrix) -> float:
    """``sum(grad * y)``: the loss whose gradient is ``grad`` with respect to ``y``.

    Examples
    --------
    >>> weighted_sum([[1.0, 2.0]], [[3.0, 4.0]])
    11.0
    """
    return sum(g * v for g_row, y_row in zip(grad, y, strict=True) for g, v in zip(g_row, y_row, strict=True))


def _slots(value: list) -> list[tuple[list, int]]:
    """Every (container, index) of a vector or a matrix (nested lists)."""
    rows = value if value and isinstance(value[0], list) else [value]
    return [(row, j) for row in rows for j in range(len(row))]


def central_differences(
    loss: Callable[[dict[str, Any]], float], params: dict[str, Any], names: Sequence[str], step: float
) -> dict[str, list]:
    """Central finite-difference gradients of ``loss`` with respect to ``params[name]`` for each name.

    Each named parameter is a vector or a matrix (nested lists); element ``p`` moves by
    ``h = step * max(1, |p|)`` and ``2h`` each way, and the two central differences are
    combined by Richardson extrapolation, ``(4 D(h) - D(2h)) / 3``: the truncation error
    falls from O(h^2) to O(h^4), so the estimate stays accurate for losses with large
    third derivatives (DVoRA's ``1 / n`` near a small norm). ``params`` is not modified.

    Examples
    --------
    >>> grads = central_differences(lambda p: p["v"][0] ** 2, {"v": [3.0]}, ["v"], 1e-5)
    >>> abs(grads["v"][0] - 6.0) < 1e-6
    True
    """
    working = {key: copy.deepcopy(value) if key in names else value for key, value in params.items()}
    grads: dict[str, list] = {}
    for name in names:
        flat = []
        for container, j in _slots(working[name]):
            saved = container[j]
            h = step * max(1.0, abs(saved))
            differences = []
            for width in (h, 2.0 * h):
                container[j] = saved + width
                up = loss(working)
                container[j] = saved - width
                down = loss(working)
                differences.append((up - down) / (2.0 * width))
            container[j] = saved
            flat.append((4.0 * differences[0] - differences[1]) / 3.0)
        value = working[name]
        width = len(value[0]) if value and isinstance(value[0], list) else 0
        grads[name] = [flat[i : i + width] for i in range(0, len(flat), width)] if width else flat
    return grads
