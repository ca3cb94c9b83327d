"""Softmax cross-entropy with its gradient, and accuracy, in Array API operations."""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of


def softmax_cross_entropy(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Mean cross-entropy of ``softmax(logits)`` against integer ``labels``, and ``dL/dlogits``.

    Parameters
    ----------
    logits : array, shape (n, classes)
    labels : integer array, shape (n,)
        Class indices in ``[0, classes)``.

    Returns
    -------
    loss : array, shape ()
        A 0-D array on the logits' device (no host copy; ``float(loss)`` to read it).
    dlogits : array, shape (n, classes)
        ``(softmax(logits) - onehot(labels)) / n``.

    Examples
    --------
    >>> import numpy as np
    >>> loss, grad = softmax_cross_entropy(np.zeros((2, 4)), np.array([0, 3]))
    >>> round(float(loss), 6) == round(float(np.log(4)), 6), grad.shape
    (True, (2, 4))
    """
    xp = array_namespace(logits, labels)
    if logits.ndim != 2 or labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"logits must be (n, classes) and labels (n,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    n, classes = logits.shape
    classes_row = xp.arange(classes, dtype=labels.dtype, device=device_of(logits))
    onehot = xp.astype(labels[:, None] == classes_row[None, :], logits.dtype)
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    exp = xp.exp(shifted)
    total = xp.sum(exp, axis=1, keepdims=True)
    log_prob = shifted - xp.log(total)
    loss = -xp.sum(onehot * log_prob) / n
    return loss, (exp / total - onehot) / n


def accuracy(logits: Any, labels: Any) -> float:
    """The fraction of rows whose largest logit is at the label (a host scalar).

    Examples
    --------
    >>> import numpy as np
    >>> accuracy(np.array([[0.0, 1.0], [2.0, 0.0]]), np.array([1, 1]))
    0.5
    """
    xp = array_namespace(logits, labels)
    hits = xp.astype(xp.argmax(logits, axis=1) == xp.astype(labels, xp.int64), xp.float64)
    return float(xp.mean(hits))
