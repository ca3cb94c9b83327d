"""Collection rules for the whole run: what needs an optional package is deselected where it is missing.

Each nox session installs one set of optional packages, so some tests and doctest modules
can never run in it. They are left out at collection, never skipped:

- a path of :data:`NEEDS` (a test file or an installed module whose doctests need a package
  at import time) is not collected;
- a test marked ``@pytest.mark.requires("torch", ...)`` is deselected, and so is one that
  another conftest marked ``cannot_apply(reason)`` (``tests/conftest.py`` does, for what the
  backend under test lacks: a dtype, a second device).

Both are listed with their reason in the header and at the end of the run. A skip is then
left for what no session can provide here: a CUDA device.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path

import pytest

# Paths (matched at the end of the absolute path) whose modules import an optional package.
NEEDS: dict[str, tuple[str, ...]] = {
    # installed modules, for their doctests (the same paths match src/ in an editable install)
    "vera_torch/*": ("torch",),
    "vera_cupy/*": ("cupy",),
    "vera_cli/demo/torch_engine.py": ("torch",),
    "vera_cli/demo/tenant_torch.py": ("torch",),
    "vera_core/testing/*": ("array_api_strict",),
    # test files
    "tests/torch/*": ("torch",),
    "tests/torch/test_torch_bnb.py": ("torch", "bitsandbytes"),
    "tests/torch/test_torch_fsdp.py": ("torch", "transformers"),
    "tests/torch/test_torch_serving.py": ("torch", "transformers"),
    "tests/interop/*": ("torch", "peft", "transformers"),
    "tests/cli/test_peft_folders.py": ("torch", "peft"),
    "tests/cli/test_demo.py": ("sklearn", "matplotlib", "tqdm"),
}


def missing(packages: tuple[str, ...]) -> str | None:
    """``"torch not installed"`` for the first of ``packages`` that does not import here, else None."""
    for package in packages:
        if importlib.util.find_spec(package) is None:
            return f"{package} not installed"
    return None


def why_not(item: pytest.Item) -> str | None:
    """Why ``item`` cannot run here (its markers say), or None."""
    for marker in item.iter_markers("cannot_apply"):
        return str(marker.args[0])
    for marker in item.iter_markers("requires"):
        reason = missing(marker.args)
        if reason is not None:
            return reason
    return None


class Requirements:
    """Registered as a plugin so that it also sees the installed packages' modules (outside this folder)."""

    def __init__(self) -> None:
        self.ignored: dict[str, str] = {}
        self.deselected: Counter[str] = Counter()

    def pytest_ignore_collect(self, collection_path: Path) -> bool | None:
        path = collection_path.as_posix()
        for pattern, packages in NEEDS.items():
            reason = missing(packages)
            if reason is not None and (fnmatch(path, f"*/{pattern}") or fnmatch(f"{path}/", f"*/{pattern}")):
                self.ignored.setdefault(pattern, reason)
                return True
        return None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        reasons = {item: reason for item in items if (reason := why_not(item)) is not None}
        if reasons:
            config.hook.pytest_deselected(items=list(reasons))
            items[:] = [item for item in items if item not in reasons]
            self.deselected.update(reasons.values())

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        lines = [f"{pattern}: not collected ({reason})" for pattern, reason in sorted(self.ignored.items())]
        lines += [f"{count} deselected: {reason}" for reason, count in sorted(self.deselected.items())]
        if lines:
            terminalreporter.write_sep("-", "left out of this run (cannot apply here)")
            for line in lines:
                terminalreporter.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(Requirements(), "vera-requirements")
