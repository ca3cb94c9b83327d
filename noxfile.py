"""The test matrix: one session per array backend, each installing only its own backend.

``nox`` runs every session below; ``nox -s "tests(backend='torch')"`` runs one.
"""

from __future__ import annotations

import os
import shutil

import nox

nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

TORCH = "torch==2.13.0"  # the CPU build; an unpinned torch pulls a multi-GB CUDA build
TEST_EXTRAS = "testing,demo"
PYTEST = ("pytest", "-q", "-p", "no:cacheprovider")

# backend -> (extras to install, extra pip requirements, VERA_BACKENDS for the conformance fixture)
BACKENDS = {
    "numpy": ("numpy", [], "numpy"),
    "strict": ("strict", [], "array_api_strict"),
    "torch": ("torch", [TORCH, "transformers>=4.45"], "torch,torch-cuda"),  # transformers: test_torch_compile
    "jax": ("jax", [], "jax"),
    "cupy": ("cupy", [], "cupy"),
}


def _has_cuda_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and os.path.exists("/dev/nvidiactl")


@nox.session
@nox.parametrize("backend", list(BACKENDS))
def tests(session: nox.Session, backend: str) -> None:
    """The conformance suite and unit tests with one array backend installed."""
    if backend == "cupy" and not _has_cuda_gpu():
        session.skip("CuPy needs a CUDA GPU and this machine has none")
    extras, requirements, selected = BACKENDS[backend]
    session.install(*requirements, "-e", f".[{extras},{TEST_EXTRAS}]")
    session.run(*PYTEST, *session.posargs, env={"VERA_BACKENDS": selected, "HYPOTHESIS_PROFILE": "ci"})


@nox.session
def interop(session: nox.Session) -> None:
    """Exact interop with Hugging Face PEFT (models built from configs; nothing is downloaded)."""
    session.install(TORCH, "-e", f".[interop,{TEST_EXTRAS}]")
    session.run(*PYTEST, "tests/interop", *session.posargs, env={"VERA_BACKENDS": "torch", "HYPOTHESIS_PROFILE": "ci"})


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
