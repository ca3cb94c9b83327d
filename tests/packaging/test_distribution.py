"""The sdist, and the wheel built from it, hold what ``pip install .`` must give a user.

The wheel has exactly five top-level packages (``vera_core``, ``vera_cli`` and the three
backends from ``src/backends``) with every file of their source folders, plus its
``.dist-info``; the sdist carries every source file and the project files needed to build it.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.requires("build")

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "vera_core": "src/vera_core",
    "vera_cli": "src/vera_cli",
    "vera_numpy": "src/backends/vera_numpy",
    "vera_torch": "src/backends/vera_torch",
    "vera_cupy": "src/backends/vera_cupy",
}


def source_files(folder: str) -> set[str]:
    """The files under ``folder`` (relative to it), compiled caches left out."""
    base = ROOT / folder
    return {
        path.relative_to(base).as_posix()
        for path in base.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``python -m build``: the sdist, then the wheel built from that sdist (not from the checkout)."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


def test_wheel_has_exactly_the_five_packages(built: tuple[Path, Path]) -> None:
    with zipfile.ZipFile(built[1]) as wheel:
        names = wheel.namelist()
    top = {name.split("/")[0] for name in names}
    dist_info = {name for name in top if name.endswith(".dist-info")}
    assert len(dist_info) == 1, top
    assert top - dist_info == set(PACKAGES)
    for package, folder in PACKAGES.items():
        shipped = {name.removeprefix(f"{package}/") for name in names if name.startswith(f"{package}/")}
        assert shipped == source_files(folder), package


def test_wheel_metadata_names_the_command_and_license(built: tuple[Path, Path]) -> None:
    with zipfile.ZipFile(built[1]) as wheel:
        (info,) = {name.split("/")[0] for name in wheel.namelist() if ".dist-info/" in name}
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
        assert wheel.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    assert "vera = vera_cli.main:main" in entry_points


def test_sdist_has_every_source_file_and_the_project_files(built: tuple[Path, Path]) -> None:
    with tarfile.open(built[0]) as sdist:
        names = sdist.getnames()
    (root,) = {name.split("/")[0] for name in names}
    inside = {name.removeprefix(f"{root}/") for name in names}
    assert {"pyproject.toml", "README.md", "LICENSE"} <= inside
    for folder in PACKAGES.values():
        assert {f"{folder}/{name}" for name in source_files(folder)} <= inside, folder
