"""vera-core: VeRA and DVoRA written once against the Python Array API standard.

The core is functional and stateless; it imports no array library itself and works
on whatever arrays it is given (NumPy, PyTorch, CuPy, JAX, array-api-strict, ...).

Examples
--------
>>> import numpy as np
>>> import vera_core as vc
>>> A, B = vc.generate_projections(seed=0, r=4, max_in=8, max_out=6, xp=np)
>>> x = np.ones((2, 8), dtype=np.float32)
>>> y, u = vc.vera_forward(x, A, B, np.full(4, 0.1, np.float32), np.zeros(6, np.float32))
>>> y.shape
(2, 6)
"""

from vera_core.dvora import (
    DvoraFrozen,
    DvoraGrads,
    DvoraRowsGrads,
    DvoraSaved,
    check_dvora_whole_layer,
    dense_norm,
    dvora_backward,
    dvora_backward_dense,
    dvora_forward,
    dvora_forward_dense,
    dvora_merge,
    dvora_norm,
    dvora_norm_rows,
    dvora_precompute,
    dvora_rows_backward,
    dvora_rows_output,
    dvora_unmerge,
    initial_magnitude,
)
from vera_core.errors import AdapterFileError
from vera_core.linear import linear, linear_input_grad
from vera_core.loading import VerifiedAdapter, read_adapter
from vera_core.projections import PRNG_ID, PRNG_VERSION, generate_projections, kaiming_bound, kaiming_uniform
from vera_core.segments import grown, segment_sum, take_rows
from vera_core.vera import (
    DENSE_MIN_SAVING,
    MergedPasses,
    VeraGrads,
    check_whole_layer,
    delta_weight,
    merge,
    merged_passes,
    unmerge,
    vera_backward,
    vera_backward_dense,
    vera_delta_rows,
    vera_forward,
    vera_forward_dense,
    vera_rows_backward,
    vera_rows_forward,
)

__version__ = "0.1.0"

__all__ = [
    "DENSE_MIN_SAVING",
    "PRNG_ID",
    "PRNG_VERSION",
    "AdapterFileError",
    "DvoraFrozen",
    "DvoraGrads",
    "DvoraRowsGrads",
    "DvoraSaved",
    "MergedPasses",
    "VeraGrads",
    "VerifiedAdapter",
    "__version__",
    "check_dvora_whole_layer",
    "check_whole_layer",
    "delta_weight",
    "dense_norm",
    "dvora_backward",
    "dvora_backward_dense",
    "dvora_forward",
    "dvora_forward_dense",
    "dvora_merge",
    "dvora_norm",
    "dvora_norm_rows",
    "dvora_precompute",
    "dvora_rows_backward",
    "dvora_rows_output",
    "dvora_unmerge",
    "generate_projections",
    "grown",
    "initial_magnitude",
    "kaiming_bound",
    "kaiming_uniform",
    "linear",
    "linear_input_grad",
    "merge",
    "merged_passes",
    "segment_sum",
    "take_rows",
    "read_adapter",
    "unmerge",
    "vera_backward",
    "vera_backward_dense",
    "vera_delta_rows",
    "vera_forward",
    "vera_forward_dense",
    "vera_rows_backward",
    "vera_rows_forward",
]
