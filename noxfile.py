"""The test matrix, run against the project as users install it.

``nox`` runs every default session below, in order; ``nox -s torch`` runs one. Each test
session (one per entry of :data:`SUITES`) installs the project NON-editable, as
``pip install ".[extras]"`` does for a user, and pytest imports those installed packages,
never ``src/``; the packages' doctests are collected from there too (``--pyargs``). Each
writes JUnit XML to ``.test-reports/SESSION.xml``; the last session, ``summary``, prints
per-session counts and fails when a test ran in no session (see ``.ci/test_summary.py``).
``readme`` runs the README's first command, literally, in a copy of this checkout.

``nox -s dev`` (not in the default run) tests an editable install, for quick iteration.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).resolve().parent
REPORTS = ROOT / ".test-reports"
# On Linux PyPI's torch wheels are CUDA builds (several GB). The pin keeps every session on
# one torch; where a CPU wheel of it is on pip's path (PyTorch's CPU index, or a local
# wheel), pip takes that one.
TORCH = "torch==2.13.0"
TRANSFORMERS = "transformers>=4.45,<6"  # tiny Llama / GPT-2 models built from their configs (FSDP2, serving, compile)
TEST_EXTRAS = ("testing", "demo")
# package -> source folder: the wheel's mapping, read from pyproject.toml
PACKAGES: dict[str, str] = {
    package: folder
    for folder, package in nox.project.load_toml(ROOT / "pyproject.toml")["tool"]["hatch"]["build"]["targets"]["wheel"][
        "sources"
    ].items()
}


@dataclass(frozen=True)
class Suite:
    """One test session: what it installs and what it runs."""

    doc: str
    extras: tuple[str, ...]
    """The project's extras besides :data:`TEST_EXTRAS`."""
    backends: str
    """``VERA_BACKENDS``: the array backends of the ``xp`` / ``backend`` fixtures."""
    requirements: tuple[str, ...] = ()
    """Further pip requirements (pins)."""
    paths: tuple[str, ...] = ("tests",)
    doctests: bool = True
    """Also collect the installed packages' doctests."""
    needs_gpu: bool = False


# A new test session is one entry here: the summary reads this table. A test file that imports
# a package only its session installs goes into NEEDS in conftest.py, so that the other
# sessions do not collect it.
SUITES: dict[str, Suite] = {
    "numpy": Suite("The suite on NumPy; the packaging tests (sdist, wheel).", ("numpy",), "numpy", ("build",)),
    "strict": Suite("The suite on array-api-strict.", ("strict",), "array_api_strict"),
    "torch": Suite(
        "The suite on PyTorch (and CUDA, with a GPU).", ("torch",), "torch,torch-cuda", (TORCH, TRANSFORMERS)
    ),
    "jax": Suite("The suite on JAX.", ("jax",), "jax"),
    "cupy": Suite("The suite on CuPy (needs a CUDA GPU).", ("cupy",), "cupy", needs_gpu=True),
    "interop": Suite(
        "Exact interop with Hugging Face PEFT (models built from configs; nothing is downloaded).",
        ("interop",),
        "torch",
        (TORCH,),
        paths=("tests/interop", "tests/cli/test_peft_folders.py"),
        doctests=False,
    ),
    "bnb": Suite(
        "Quantized bases: bitsandbytes 4-bit and 8-bit layers on the CPU (accelerate for the docs recipe).",
        ("torch",),
        "torch",
        (TORCH, TRANSFORMERS, "bitsandbytes==0.50.2", "accelerate>=1.0"),
        paths=("tests/torch/test_torch_bnb.py",),
        doctests=False,
    ),
}


def _has_cuda_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and os.path.exists("/dev/nvidiactl")


def _test(session: nox.Session, name: str, suite: Suite) -> None:
    REPORTS.mkdir(exist_ok=True)
    for stale in REPORTS.glob(f"{name}.*"):
        stale.unlink()
    if suite.needs_gpu and not _has_cuda_gpu():
        reason = f"{name} needs a CUDA GPU and this machine has none"
        (REPORTS / f"{name}.skipped").write_text(reason + "\n")
        session.skip(reason)
    session.install(*suite.requirements, f".[{','.join((*suite.extras, *TEST_EXTRAS))}]")
    doctests = ("--pyargs", *PACKAGES) if suite.doctests else ()
    session.run(
        "pytest",
        "-p",
        "no:cacheprovider",
        f"--junitxml={REPORTS / f'{name}.xml'}",
        *suite.paths,
        *doctests,
        *session.posargs,
        env={"VERA_BACKENDS": suite.backends, "HYPOTHESIS_PROFILE": "ci", "VERA_TEST_INSTALLED": "1"},
    )


def _register(name: str, suite: Suite) -> None:
    def run(session: nox.Session) -> None:
        _test(session, name, suite)

    run.__doc__ = suite.doc
    nox.session(name=name)(run)


for _name, _suite in SUITES.items():
    _register(_name, _suite)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and mypy."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation; any warning fails the build."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")


@nox.session(venv_backend="none")
def readme(session: nox.Session) -> None:
    """The README's first command, run literally in a copy of this checkout; then its outputs are checked."""
    session.run(sys.executable, str(ROOT / ".ci" / "readme_first_command.py"), external=True)


@nox.session(venv_backend="none")
def summary(session: nox.Session) -> None:
    """Per-session passed/skipped/failed counts; fails when a test ran in no session (keep this session last)."""
    session.run(
        sys.executable,
        str(ROOT / ".ci" / "test_summary.py"),
        str(REPORTS),
        "--sessions",
        *SUITES,
        "--tests",
        str(ROOT / "tests"),
        *(f"--package={package}={ROOT / folder}" for package, folder in PACKAGES.items()),
        external=True,
    )


@nox.session(default=False)
def dev(session: nox.Session) -> None:
    """Every CPU backend against an editable install (quick iteration; not part of the default run)."""
    session.install(TORCH, "build", "-e", f".[strict,torch,jax,interop,{','.join(TEST_EXTRAS)}]")
    session.run("pytest", "-p", "no:cacheprovider", "tests", "--pyargs", *PACKAGES, *session.posargs)
