"""Conformance checks for vera-core on any Array API namespace.

A new backend proves itself with one call, :func:`check_namespace`; each check is also
public, and takes the problem (:class:`Case`) and dtype so that tests can parametrise
them. The oracles are pure Python (:mod:`vera_core.testing.spec` for the projection
stream, :mod:`vera_core.testing.reference` for the adapters), so the checks need no
NumPy. :data:`BACKENDS` describes the libraries the test suite runs on; none is
imported until asked for.

Examples
--------
>>> import array_api_strict as xp
>>> from vera_core.testing import check_namespace
>>> check_namespace(xp, xp.Device("CPU_DEVICE"), other_device=xp.Device("device1"))
"""

from __future__ import annotations

from typing import Any

from vera_core.testing._values import supported_floats
from vera_core.testing.adapter_checks import (
    ADAPTER_CHECKS,
    DVORA_CHECKS,
    VERA_CHECKS,
    check_dvora_backward,
    check_dvora_forward,
    check_dvora_merge,
    check_dvora_norm,
    check_vera_backward,
    check_vera_forward,
    check_vera_merge,
)
from vera_core.testing.backends import BACKENDS, Backend, BackendError, LoadedBackend, load_backend, selected_backends
from vera_core.testing.cases import CONFORMANCE_CASES, DEFAULT_CASE, Case, Layer
from vera_core.testing.error_checks import ERROR_CASES, ErrorCase, check_error_case, check_errors
from vera_core.testing.prng_checks import check_projections, check_threefry

__all__ = [
    "ADAPTER_CHECKS",
    "BACKENDS",
    "CONFORMANCE_CASES",
    "DEFAULT_CASE",
    "DVORA_CHECKS",
    "ERROR_CASES",
    "VERA_CHECKS",
    "Backend",
    "BackendError",
    "Case",
    "ErrorCase",
    "Layer",
    "LoadedBackend",
    "check_adapters",
    "check_dvora_backward",
    "check_dvora_forward",
    "check_dvora_merge",
    "check_dvora_norm",
    "check_error_case",
    "check_errors",
    "check_namespace",
    "check_projections",
    "check_threefry",
    "check_vera_backward",
    "check_vera_forward",
    "check_vera_merge",
    "load_backend",
    "selected_backends",
]


def check_adapters(xp: Any, device: Any = None) -> None:
    """Every VeRA and DVoRA check, for each :data:`CONFORMANCE_CASES` and each floating dtype of ``device``.

    16-bit activations (where ``xp`` has them) run beside float32 vectors.

    Parameters
    ----------
    xp : namespace
        The Array API namespace under test.
    device : device, optional
        Where to run; default the namespace's default device.

    Raises
    ------
    AssertionError
        Naming the check, dtype and case that failed.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> check_adapters(xp, xp.Device("no_float64"))
    """
    for dtype in supported_floats(xp, device):
        for case in CONFORMANCE_CASES:
            for name, check in ADAPTER_CHECKS.items():
                try:
                    check(xp, device, case=case, dtype=dtype)
                except AssertionError as exc:
                    raise AssertionError(f"{name}, {dtype}, {case}: {exc}") from exc


def check_namespace(xp: Any, device: Any = None, *, other_device: Any = None) -> None:
    """Run every conformance check of vera-core on ``xp`` and ``device``.

    Threefry (both word representations), the projection stream bit for bit, VeRA and
    DVoRA forward, backward and merging against float64 oracles in every floating dtype
    the device supports, and every documented error.

    Parameters
    ----------
    xp : namespace
        An Array API namespace (e.g. ``numpy``, ``array_api_compat.torch``, ``jax.numpy``).
    device : device, optional
        Where to run; default the namespace's default device.
    other_device : device, optional
        A second device of ``xp``: enables the mixed-device error check.

    Raises
    ------
    AssertionError
        With the failing check and what differed.

    Examples
    --------
    >>> import numpy as np
    >>> check_namespace(np)
    """
    for check in (check_threefry, check_projections, check_adapters):
        check(xp, device)
    check_errors(xp, device, other_device)
