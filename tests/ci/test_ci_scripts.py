"""The scripts of ``.ci/``: the closing test summary and the README's first command."""

from __future__ import annotations

import doctest
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / ".ci" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


summary = load("test_summary")
readme = load("readme_first_command")


@pytest.mark.parametrize("module", [summary, readme], ids=lambda m: m.__name__)
def test_examples(module: ModuleType) -> None:
    failed, attempted = doctest.testmod(module)
    assert attempted > 0 and failed == 0


TESTS = {
    "test_a.py": """
        import os
        import pytest

        SESSION = os.environ["SESSION"]

        def test_runs_everywhere():
            pass

        def test_needs_jax():
            if SESSION != "jax":
                pytest.skip("jax not installed")

        def test_needs_a_gpu():
            pytest.skip("torch-cuda: no CUDA device")

        def test_never_runs():
            if SESSION != "numpy" or os.environ.get("BREAK"):
                pytest.skip("NumPy has no bfloat16")
    """,
    "test_b.py": """
        import os
        import pytest

        if os.environ["SESSION"] == "numpy":
            pytest.skip("torch not installed", allow_module_level=True)

        def test_torch():
            assert not os.environ.get("FAIL")
    """,
}


def run_sessions(tmp_path: Path, **env: str) -> Path:
    """Two sessions' JUnit reports of a small suite (real pytest runs), and a third session skipped whole."""
    tests = tmp_path / "tests"
    tests.mkdir(exist_ok=True)
    for name, source in TESTS.items():
        (tests / name).write_text(textwrap.dedent(source))
    reports = tmp_path / "reports"
    reports.mkdir(exist_ok=True)
    for session in ("numpy", "jax"):
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={reports / session}.xml"],
            cwd=tmp_path,
            env={**env, "SESSION": session, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            check=False,
        )
    (reports / "cupy.skipped").write_text("cupy needs a CUDA GPU and this machine has none\n")
    return reports


def summarise(tmp_path: Path, reports: Path, capsys: pytest.CaptureFixture[str], *sessions: str) -> tuple[int, str]:
    code = summary.main([str(reports), "--sessions", *sessions, "--tests", str(tmp_path / "tests")])
    return code, capsys.readouterr().out


def test_summary_passes_when_every_test_ran_somewhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = summarise(tmp_path, run_sessions(tmp_path), capsys, "numpy", "jax", "cupy")
    assert code == 0, out
    assert "numpy              2        3       0" in out  # passed, skipped (test_b: one, at collection), failed
    assert "jax                3        2       0" in out
    assert "cupy         session skipped: cupy needs a CUDA GPU" in out
    assert "torch not installed" in out and "torch-cuda: no CUDA device" in out  # every skip reason is listed
    assert out.rstrip().endswith("total: 5 passed, 0 failed, 5 skipped")


def test_summary_fails_on_a_test_skipped_in_every_session(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = summarise(tmp_path, run_sessions(tmp_path, BREAK="1"), capsys, "numpy", "jax")
    assert code == 1
    assert "tests.test_a::test_never_runs ran in no session: numpy: NumPy has no bfloat16; jax: NumPy has" in out
    assert "test_needs_a_gpu" not in out.split("problems:")[1]  # skipped everywhere, but only for the GPU


def test_summary_fails_on_a_failure_a_missing_report_and_an_uncollected_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reports = run_sessions(tmp_path, FAIL="1")
    (tmp_path / "tests" / "test_c.py").write_text("def test_c():\n    pass\n")  # in no report
    code, out = summarise(tmp_path, reports, capsys, "numpy", "jax", "torch")
    assert code == 1
    assert "jax: tests.test_b::test_torch failed" in out
    assert "torch: wrote no report" in out
    assert "tests.test_c was collected by no session" in out


def test_summary_counts_a_module_skipped_at_collection_as_covered_where_it_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = summarise(tmp_path, run_sessions(tmp_path), capsys, "numpy")  # test_b only skipped here
    assert code == 1
    assert "tests.test_b ran in no session: numpy: torch not installed" in out


def test_readme_first_command_is_one_line_that_installs_and_runs_the_demo() -> None:
    (command,) = readme.console_blocks((ROOT / "README.md").read_text())[0]
    assert 'pip install ".[demo]"' in command and command.endswith("vera demo")


def test_ci_runs_the_readme_test_command() -> None:
    """``.ci/run`` runs exactly the README's second command, the whole test matrix."""
    (command,) = readme.console_blocks((ROOT / "README.md").read_text())[1]
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command == "python3 -m pip install nox && python3 -m nox"
    assert script[-1] == command and "set -euo pipefail" in script


@pytest.mark.requires("sklearn", "matplotlib", "tqdm")
def test_readme_check_reads_the_demo_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vera_cli.main import main

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    rows = readme.check_table(capsys.readouterr().out)
    assert [row.split("  ")[0] for row in rows] == ["Full fine-tuning", "LoRA (r=4)", "VeRA (r=32)", "DVoRA (r=32)"]
    with pytest.raises(readme.ReadmeError, match="no table header"):
        readme.check_table("pretrained MLP\n")
