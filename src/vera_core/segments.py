"""Rows to adapters and back: the gather and the sum of a mixed-adapter batch.

A mixed-adapter batch gives each leading row an adapter by index (``-1``: none). The
forward gathers each row's vectors (:func:`take_rows`); the backward sums the rows'
gradients per adapter (:func:`segment_sum`), so a step's gradient holds only the adapters
it used, never one row per adapter of the bank. A bank that needs more rows, and the
optimizer state beside it, grows with :func:`grown`.

The Array API has no scatter-add. :func:`segment_sum` takes the library's own where it
has one (NumPy: a segmented ``add.reduceat`` over rows grouped by adapter, or a reshaped sum when
every adapter has as many rows; CuPy:
``cupyx.scatter_add``) and otherwise a product with a one-hot matrix of (segments x
rows), which needs nothing beyond the standard.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import device as device_of
from array_api_compat import is_cupy_namespace, is_numpy_namespace

from vera_core._validation import check_positive_int, namespace, require_arrays


def _check_ids(name: str, ids: Any, rows: int) -> None:
    xp = namespace(ids)
    if not xp.isdtype(ids.dtype, "integral"):
        raise TypeError(f"{name} must have an integer dtype, got {ids.dtype}")
    if ids.ndim != 1 or ids.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows},) (one entry per row), got {tuple(ids.shape)}")


def segment_sum(values: Any, segment_ids: Any, num_segments: int) -> Any:
    """Sum the rows of ``values`` that share a segment: ``out[s] = sum of values[i] where segment_ids[i] == s``.

    Parameters
    ----------
    values : array, shape (n, ...)
    segment_ids : integer array, shape (n,)
        Each row's segment in ``[0, num_segments)``, or ``-1`` for rows to leave out.
        Other values are an error the function does not check (it would cost a
        device-to-host copy).
    num_segments : int

    Returns
    -------
    array, shape (num_segments, ...)
        In the dtype of ``values``; segments no row names are zero.

    Examples
    --------
    >>> import numpy as xp
    >>> values = xp.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    >>> segment_sum(values, xp.asarray([1, 0, 1, -1]), 3).tolist()
    [[3.0, 4.0], [6.0, 8.0], [0.0, 0.0]]
    """
    require_arrays(values=values, segment_ids=segment_ids)
    xp = namespace(values, segment_ids)
    check_positive_int("num_segments", num_segments)
    if values.ndim < 1:
        raise ValueError("values must have at least one dimension (rows)")
    _check_ids("segment_ids", segment_ids, values.shape[0])
    if is_numpy_namespace(xp):
        return _numpy_segment_sum(values, segment_ids, num_segments)
    if is_cupy_namespace(xp):
        import cupyx

        out = xp.zeros((num_segments + 1, *values.shape[1:]), dtype=values.dtype)  # -1 lands in the spare last row
        cupyx.scatter_add(out, segment_ids, values)
        return out[:num_segments, ...]
    dev = device_of(values)
    segments = xp.arange(num_segments, dtype=segment_ids.dtype, device=dev)
    onehot = xp.astype(segments[:, None] == segment_ids[None, :], values.dtype)  # -1 matches no segment
    flat = xp.reshape(values, (values.shape[0], -1))
    return xp.reshape(onehot @ flat, (num_segments, *values.shape[1:]))


def _numpy_segment_sum(values: Any, segment_ids: Any, num_segments: int) -> Any:
    """NumPy: rows grouped by segment (a stable sort unless they already are), then one ``add.reduceat``."""
    import numpy as np

    out = np.zeros((num_segments + 1, *values.shape[1:]), dtype=values.dtype)  # -1 lands in the spare last row
    if values.shape[0] == 0:
        return out[:num_segments]
    ids = np.asarray(segment_ids)
    if np.any(ids[1:] < ids[:-1]):
        order = np.argsort(ids, kind="stable")
        ids, values = ids[order], values[order]
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
    length = values.shape[0] // starts.shape[0]
    if length * starts.shape[0] == values.shape[0] and np.all(starts == length * np.arange(starts.shape[0])):
        # segments of one length (a batch of k rows per adapter): a reshaped sum, ~4x faster than reduceat
        sums = values.reshape(starts.shape[0], length, *values.shape[1:]).sum(axis=1)
    else:
        sums = np.add.reduceat(values, starts, axis=0)
    out[ids[starts]] = sums
    return out[:num_segments]


def take_rows(table: Any, rows: Any, *, fill: float = 0.0) -> Any:
    """Row ``rows[i]`` of ``table`` for each ``i``, and ``fill`` where ``rows[i]`` is ``-1``.

    Parameters
    ----------
    table : array, shape (k, ...)
    rows : integer array, shape (n,)
        Rows of ``table``, or ``-1``.
    fill : float
        The value of the rows that name none.

    Returns
    -------
    array, shape (n, ...)

    Examples
    --------
    >>> import numpy as xp
    >>> table = xp.asarray([[1.0, 2.0], [3.0, 4.0]])
    >>> take_rows(table, xp.asarray([1, -1, 0]), fill=1.0).tolist()
    [[3.0, 4.0], [1.0, 1.0], [1.0, 2.0]]
    """
    require_arrays(table=table, rows=rows)
    if isinstance(fill, bool) or not isinstance(fill, (int, float)):
        raise TypeError(f"fill must be a number, got {type(fill).__name__}: {fill!r}")
    xp = namespace(table, rows)
    if table.ndim < 1 or table.shape[0] == 0:
        raise ValueError(f"table must have at least one row, got shape {tuple(table.shape)}")
    _check_ids("rows", rows, rows.shape[0] if rows.ndim == 1 else -1)
    named = rows >= 0
    gathered = xp.take(table, xp.where(named, rows, xp.zeros_like(rows)), axis=0)
    named = xp.reshape(named, (rows.shape[0],) + (1,) * (table.ndim - 1))
    return xp.where(named, gathered, xp.full_like(gathered, fill))


def grown(array: Any, shape: tuple[int, ...]) -> Any:
    """A zero array of ``shape`` holding ``array`` in its leading block: a bank, or its optimizer state, grown.

    Parameters
    ----------
    array : array
    shape : tuple of int
        As many sizes as ``array`` has axes, none smaller than its own.

    Returns
    -------
    array
        ``array``'s dtype and device.

    Examples
    --------
    >>> import numpy as np
    >>> grown(np.ones((1, 2)), (2, 3)).tolist()
    [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """
    require_arrays(array=array)
    sizes_ok = isinstance(shape, tuple) and len(shape) == array.ndim
    if not sizes_ok or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= m for n, m in zip(shape, array.shape, strict=True)
    ):
        raise ValueError(
            f"an array of shape {tuple(array.shape)} can only grow to a tuple of {array.ndim} sizes,"
            f" none smaller; got {shape!r}"
        )
    xp = namespace(array)
    new = xp.zeros(shape, dtype=array.dtype, device=device_of(array))
    new[tuple(slice(0, n) for n in array.shape)] = array
    return new
