"""Argument checks shared by the core: each raises before anything is computed."""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

from array_api_compat import array_namespace, is_array_api_obj, is_torch_array
from array_api_compat import device as device_of

_ARRAY_TYPES: set[type] = set()
"""Types already seen to be arrays (the common case costs one set lookup)."""


def require_arrays(**named: Any) -> None:
    """TypeError naming the first argument that is not an array (before any attribute is read)."""
    for name, value in named.items():
        if type(value) not in _ARRAY_TYPES:
            if not is_array_api_obj(value):
                raise TypeError(f"{name} must be an array, got {type(value).__name__}: {_shown(value)}")
            _ARRAY_TYPES.add(type(value))


def optional_arrays(**named: Any) -> None:
    """:func:`require_arrays` for arguments that may also be None."""
    require_arrays(**{name: value for name, value in named.items() if value is not None})


def require_flags(**named: Any) -> None:
    """TypeError unless each argument is True or False (an array's truth value is not a flag)."""
    for name, value in named.items():
        if value is not True and value is not False:
            raise TypeError(f"{name} must be True or False, got {type(value).__name__}: {_shown(value)}")


def check_namespace(xp: Any) -> None:
    """TypeError unless ``xp`` looks like an Array API namespace."""
    if not all(hasattr(xp, name) for name in ("asarray", "astype", "float32", "isdtype")):
        raise TypeError(f"xp must be an Array API namespace, got {type(xp).__name__}: {_shown(xp)}")


def check_positive_int(name: str, value: Any) -> None:
    """Raise unless ``value`` is a positive int (bool excluded)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# per-step host time matters (a GPU waits on it): the namespace array-api-compat picks depends
# only on the arrays' types, so it is looked up once per combination of types
_NAMESPACES: dict[frozenset[type], Any] = {}


def _torch_compiling(array: Any) -> bool:
    # torch.compile refuses Python-side caches inside an autograd.Function; a torch array means
    # torch is imported already (nothing is imported here)
    return is_torch_array(array) and sys.modules["torch"].compiler.is_compiling()


def namespace(*arrays: Any) -> Any:
    """``array_namespace(*arrays)``, remembered per combination of array types.

    Anything that is not an array, or a mix of libraries, raises TypeError every time
    (nothing is remembered for it); under ``torch.compile`` nothing is remembered either.
    """
    if _torch_compiling(arrays[0]):
        return array_namespace(*arrays)
    types = frozenset(map(type, arrays))
    xp = _NAMESPACES.get(types)
    if xp is None:
        for array in arrays:
            if not is_array_api_obj(array):
                raise TypeError(f"expected arrays, got {type(array).__name__}: {_shown(array)}")
        try:
            xp = array_namespace(*arrays)
        except TypeError as error:
            raise TypeError(f"the arrays must come from one Array API library: {error}") from None
        _NAMESPACES[types] = xp
    return xp


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_real_float(xp: Any, dtype: Any) -> bool:
    """True when ``dtype`` is a real floating dtype of ``xp`` (bfloat16 included)."""
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except (TypeError, ValueError):
        return False


def check_real_float_dtype(xp: Any, dtype: Any, name: str) -> None:
    """Raise TypeError unless ``dtype`` is real floating."""
    if not is_real_float(xp, dtype):
        raise TypeError(f"{name} must have a real floating dtype, got {dtype}")


def is_half(xp: Any, dtype: Any) -> bool:
    """True for 16-bit floating dtypes (float16, bfloat16)."""
    return int(xp.finfo(dtype).bits) == 16


def _device(array: Any) -> Any:
    # a torch tensor's own attribute: array-api-compat's generic device() costs more than small products
    return array.device if is_torch_array(array) else device_of(array)


def check_same_device(named_arrays: dict[str, Any]) -> None:
    """Raise ValueError when the arrays (None entries skipped) live on different devices."""
    first_name, first = None, None
    for name, array in named_arrays.items():
        # tracers (JAX transformations) report no device: they cannot disagree with one
        dev = None if array is None else _device(array)
        if dev is None:
            continue
        if first is None:
            first_name, first = name, dev
        elif dev != first:
            raise ValueError(f"{name} is on device {dev} but {first_name} is on {first}; move them to one device")


def check_ndim(name: str, array: Any, ndim: int, meaning: str) -> None:
    """Raise ValueError unless ``array`` has ``ndim`` dimensions."""
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {meaning} ({ndim}-D), got shape {tuple(array.shape)}")


class AdapterShape(NamedTuple):
    """Sizes of one adapted layer: rank, output and input features."""

    rank: int
    out_features: int
    in_features: int


def check_vector_dtype(xp: Any, vector_dtype: Any, activation_dtype: Any) -> None:
    """Vectors match the activations, or are float32 beside 16-bit activations."""
    if vector_dtype == activation_dtype:
        return
    if is_half(xp, activation_dtype) and vector_dtype == xp.float32:
        return
    raise TypeError(
        f"the trainable vectors have dtype {vector_dtype} but the activations have {activation_dtype}; "
        "vectors must match the activations, or be float32 beside float16/bfloat16 activations"
    )


def check_adapter(
    A: Any,
    B: Any,
    lambda_d: Any,
    lambda_b: Any,
    in_features: int,
    *,
    activation_dtype: Any = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Any, AdapterShape]:
    """Check the shared matrices and one layer's vectors; return the namespace and sizes.

    ``extra`` names further arrays (the input, a weight, a mask) that must share the
    namespace and device.
    """
    named = {"A": A, "B": B, "lambda_d": lambda_d, "lambda_b": lambda_b, **(extra or {})}
    present = {k: v for k, v in named.items() if v is not None}
    xp = namespace(*present.values())
    checked: list[Any] = []  # each distinct dtype once
    for name, array in present.items():
        if array.dtype not in checked:
            check_real_float_dtype(xp, array.dtype, name)
            checked.append(array.dtype)
    check_ndim("A", A, 2, "the shared matrix A (rank x max_in)")
    check_ndim("B", B, 2, "the shared matrix B (max_out x rank)")
    check_ndim("lambda_d", lambda_d, 1, "a vector of length rank")
    check_ndim("lambda_b", lambda_b, 1, "a vector of length out_features")
    shared_rank, max_in = A.shape
    max_out = B.shape[0]
    if B.shape[1] != shared_rank:
        raise ValueError(f"A has {shared_rank} rows but B has {B.shape[1]} columns; both are the shared rank")
    if B.dtype != A.dtype and B.dtype != lambda_d.dtype:
        # B is only folded with the vectors: it may be kept in their dtype beside a 16-bit A
        raise TypeError(
            f"B has dtype {B.dtype} but A has {A.dtype} and the vectors {lambda_d.dtype}; "
            "B must share a dtype with A or with the vectors"
        )
    rank, out_features = lambda_d.shape[0], lambda_b.shape[0]
    if rank <= 0:
        raise ValueError("rank must be positive: lambda_d is empty")
    if out_features <= 0:
        raise ValueError("lambda_b is empty: the layer must have at least one output feature")
    if rank > shared_rank:
        raise ValueError(f"lambda_d has length {rank} but the shared matrices have rank {shared_rank}")
    if out_features > max_out:
        raise ValueError(
            f"the layer has {out_features} output features but the shared B has only {max_out} rows; "
            "regenerate the projections with a larger max_out"
        )
    if in_features > max_in:
        raise ValueError(
            f"the layer has {in_features} input features but the shared A has only {max_in} columns; "
            "regenerate the projections with a larger max_in"
        )
    if lambda_d.dtype != lambda_b.dtype:
        raise TypeError(f"lambda_d has dtype {lambda_d.dtype} but lambda_b has {lambda_b.dtype}")
    if activation_dtype is not None:
        check_vector_dtype(xp, lambda_d.dtype, activation_dtype)
    check_same_device(present)
    return xp, AdapterShape(rank, out_features, in_features)


def check_activations(name: str, x: Any, features: int, axis_meaning: str) -> None:
    """Raise unless ``x`` has at least one dimension and ``features`` on its last axis."""
    if x.ndim < 1:  # before the shape: a 0-d x reaches here with features 0
        raise ValueError(f"{name} must have at least one dimension ({axis_meaning}), got a 0-d array")
    if x.shape[-1] != features:
        raise ValueError(f"{name} must have shape (..., {features}) ({axis_meaning}), got {tuple(x.shape)}")


def check_same_shape(name: str, array: Any, expected: tuple[int, ...], reference: str) -> None:
    """Raise unless ``array`` has the ``expected`` shape."""
    if tuple(array.shape) != tuple(expected):
        raise ValueError(f"{name} must have the shape of {reference}, {tuple(expected)}; got {tuple(array.shape)}")


def check_finite(xp: Any, name: str, array: Any) -> None:
    """Raise ValueError when ``array`` holds NaN or infinity."""
    if not bool(xp.all(xp.isfinite(array))):
        raise ValueError(f"{name} contains NaN or infinity; refusing to merge (merge with safe=False to force)")
