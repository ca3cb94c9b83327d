"""The demo's data: scikit-learn's handwritten digits, which ship inside the package.

The pretraining task is to classify the digits; the new task is to classify the same
digits rotated by 90 degrees, which the pretrained network gets mostly wrong.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IMAGE_SIDE = 8
CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Split:
    """Inputs (n, 64) in float32, scaled to [0, 1], and integer labels (n,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclasses.dataclass(frozen=True)
class Tasks:
    """The pretraining task and the new task, on disjoint halves of the images."""

    pretrain: Split
    adapt: Split


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, rng: np.random.Generator) -> Split:
    order = rng.permutation(len(y))
    cut = round(len(y) * (1.0 - test_fraction))
    train, test = order[:cut], order[cut:]
    return Split(x[train], y[train], x[test], y[test])


def rotate(x: np.ndarray) -> np.ndarray:
    """Rotate flattened 8x8 images by 90 degrees counter-clockwise.

    Examples
    --------
    >>> image = np.arange(64, dtype=np.float32)[None, :]
    >>> bool(np.array_equal(rotate(rotate(rotate(rotate(image)))), image))
    True
    """
    images = x.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    return np.ascontiguousarray(np.rot90(images, k=1, axes=(1, 2))).reshape(len(x), -1)


def load_tasks(seed: int, *, test_fraction: float = 0.3, limit: int | None = None) -> Tasks:
    """Split the 1,797 digits in two halves: one to pretrain on, one (rotated) to adapt to.

    Parameters
    ----------
    seed : int
        Seeds the shuffles.
    test_fraction : float
        Share of each half held out for testing.
    limit : int, optional
        Use only this many images (for quick runs).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))[:limit]
    half = len(order) // 2
    first, second = order[:half], order[half:]
    return Tasks(
        pretrain=_split(x[first], y[first], test_fraction, rng),
        adapt=_split(rotate(x[second]), y[second], test_fraction, rng),
    )
