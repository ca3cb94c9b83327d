"""The nox test sessions test the installed wheel: every ``vera_*`` module comes from site-packages.

``VERA_TEST_INSTALLED=1`` (set by the nox test sessions) says the run is against an
installed, non-editable project; elsewhere (a checkout on ``PYTHONPATH``, ``nox -s dev``)
this test cannot apply and is deselected.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vera_core", "vera_cli", "vera_numpy", "vera_torch", "vera_cupy")

pytestmark = (
    []
    if os.environ.get("VERA_TEST_INSTALLED") == "1"
    else [pytest.mark.cannot_apply("not a run against the installed wheel (VERA_TEST_INSTALLED unset)")]
)


def test_every_imported_vera_module_is_the_installed_one() -> None:
    """Those the tests and doctests imported so far, and the three that import without extras."""
    import vera_cli.main
    import vera_core
    import vera_numpy

    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    imported = {
        name: Path(module.__file__).resolve()
        for name, module in list(sys.modules.items())
        if name.split(".")[0] in PACKAGES and getattr(module, "__file__", None)
    }
    assert {vera_core.__name__, vera_numpy.__name__, vera_cli.main.__name__} <= set(imported)
    outside = {name: str(path) for name, path in imported.items() if not path.is_relative_to(site_packages)}
    assert not outside, f"imported from outside {site_packages}: {outside}"
    assert not any(Path(entry or ".").resolve().is_relative_to(ROOT / "src") for entry in sys.path), sys.path
