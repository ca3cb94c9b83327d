"""The array namespace and device an adapter lives on, and host conversion for file I/O."""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_cupy_array
from array_api_compat import device as device_of


class Backend:
    """An Array API namespace ``xp``, a device, and conversion to and from NumPy.

    Host copies happen only in :meth:`to_host` and :meth:`from_host`, which the
    library calls at file I/O alone.

    Parameters
    ----------
    xp : namespace
        An Array API namespace (``array_api_compat.numpy``, ``array_api_strict``, ...).
    device : device, optional
        Where new arrays go; default the namespace's default device.

    Examples
    --------
    >>> import numpy as np
    >>> backend = Backend.of(np.zeros(3))
    >>> backend.to_host(backend.from_host(np.ones(2))).tolist()
    [1.0, 1.0]
    """

    def __init__(self, xp: Any, device: Any = None) -> None:
        self.xp = xp
        self.device = device

    @classmethod
    def of(cls, array: Any) -> Backend:
        """The backend of an existing array (CuPy arrays get :class:`vera_cupy.CupyBackend`)."""
        if is_cupy_array(array):
            from vera_cupy import CupyBackend

            return CupyBackend(device_of(array))
        return cls(array_namespace(array), device_of(array))

    def from_host(self, host: Any) -> Any:
        """A NumPy array copied into this namespace and device."""
        return self.xp.asarray(host, device=self.device)

    def to_host(self, array: Any) -> np.ndarray:
        """A NumPy copy (or view) of ``array``."""
        return np.asarray(array)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self.xp, '__name__', self.xp)}, device={self.device!r})"


def vector_dtype(xp: Any, dtype: Any) -> Any:
    """The dtype of the trainable vectors beside weights of ``dtype``: itself, or float32 for 16-bit.

    Examples
    --------
    >>> import numpy as np
    >>> vector_dtype(np, np.float16), vector_dtype(np, np.float64)
    (<class 'numpy.float32'>, <class 'numpy.float64'>)
    """
    return xp.float32 if int(xp.finfo(dtype).bits) < 32 else dtype
