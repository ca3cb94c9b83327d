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


def rotate_by(images: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """Rotate flattened 8x8 images counter-clockwise about their centre, each row of images by its own angle.

    Bilinear interpolation, zero outside the image.

    Parameters
    ----------
    images : array, shape (n, p, 64) or (p, 64)
        Each of ``n`` sets of images, or one set shared by all ``n`` angles.
    degrees : array, shape (n,)

    Returns
    -------
    array, shape (n, p, 64), float32

    Examples
    --------
    >>> image = np.arange(64, dtype=np.float32)[None, :]
    >>> turned = rotate_by(image, np.asarray([90.0, 0.0]))
    >>> bool(np.allclose(turned[0], rotate(image), atol=1e-4)), bool(np.allclose(turned[1], image, atol=1e-4))
    (True, True)
    """
    theta = np.deg2rad(np.asarray(degrees, dtype=np.float64))[:, None, None]
    rows, cols = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE].astype(np.float64)
    centre = (IMAGE_SIDE - 1) / 2.0
    # each output pixel reads the source pixel that the rotation moves onto it (row 0 is the top)
    c, s = np.cos(theta), np.sin(theta)
    source_col = c * (cols - centre) - s * (rows - centre) + centre
    source_row = s * (cols - centre) + c * (rows - centre) + centre
    col0, row0 = np.floor(source_col), np.floor(source_row)
    frac_col, frac_row = source_col - col0, source_row - row0
    count = theta.shape[0]
    shared = images.ndim == 2
    sets = images.reshape(1 if shared else count, -1, IMAGE_SIDE * IMAGE_SIDE)
    out = np.zeros((count, sets.shape[1], IMAGE_SIDE * IMAGE_SIDE), dtype=np.float32)
    for d_row in (0, 1):
        for d_col in (0, 1):
            r, k = row0 + d_row, col0 + d_col
            weight = (frac_row if d_row else 1 - frac_row) * (frac_col if d_col else 1 - frac_col)
            inside = (r >= 0) & (r < IMAGE_SIDE) & (k >= 0) & (k < IMAGE_SIDE)
            index = (np.clip(r, 0, IMAGE_SIDE - 1) * IMAGE_SIDE + np.clip(k, 0, IMAGE_SIDE - 1)).astype(np.int64)
            weight = np.where(inside, weight, 0.0).reshape(count, 1, -1).astype(np.float32)
            index = index.reshape(count, 1, -1)
            if shared:
                out += weight * sets[0][:, index[:, 0, :]].transpose(1, 0, 2)
            else:
                out += weight * np.take_along_axis(sets, np.broadcast_to(index, out.shape), axis=2)
    return out


def load_halves(seed: int, *, test_fraction: float = 0.3, limit: int | None = None) -> Tasks:
    """Split the 1,797 digits in two halves, both upright: one to pretrain on, one for new tasks.

    The same split as :func:`load_tasks`, without the rotation.
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
        adapt=_split(x[second], y[second], test_fraction, rng),
    )


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
    halves = load_halves(seed, test_fraction=test_fraction, limit=limit)
    adapt = halves.adapt
    return Tasks(halves.pretrain, Split(rotate(adapt.x_train), adapt.y_train, rotate(adapt.x_test), adapt.y_test))
