"""The closing summary of a full ``nox`` run, from the JUnit XML each test session wrote.

Prints, per test session, how many tests passed, were skipped and failed, then every skip
reason, and exits 1 when:

- a test failed, or a session wrote no report (and was not skipped as a whole);
- a test was skipped in every session that collected it, for a reason other than a
  missing CUDA device (:data:`GPU_REASON`): it ran nowhere;
- a test file, or a module with doctests, was collected by no session.

Usage: ``python .ci/test_summary.py REPORTS --sessions numpy strict ... --tests tests
--package vera_core=src/vera_core ...``. ``REPORTS/NAME.xml`` is session NAME's report;
``REPORTS/NAME.skipped`` holds the reason a session did not run at all.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

GPU_REASON = "no CUDA device"
"""Every skip for a missing GPU says this; a test skipped only for it everywhere is accepted."""


@dataclass
class Report:
    """The outcomes of one session's tests, by test id."""

    passed: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    skipped: dict[str, str] = field(default_factory=dict)
    """Test id -> skip reason."""
    modules: set[str] = field(default_factory=set)
    """The JUnit class names: dotted paths of the collected files (``tests.core.test_rows``,
    ``.nox.numpy.lib.python3.11.site-packages.vera_core.vera``)."""


def test_id(classname: str, name: str) -> str:
    """A test's id, the same in every session: ``tests.core.test_rows::test_x[numpy]``.

    A module skipped at collection (empty classname) is its dotted path; a doctest is its
    object's dotted name (``vera_core.vera.merge``), wherever its module was imported from.

    Examples
    --------
    >>> test_id("tests.core.test_rows", "test_rows_check_their_shapes[numpy]")
    'tests.core.test_rows::test_rows_check_their_shapes[numpy]'
    >>> test_id("", "tests.torch.test_torch_model")
    'tests.torch.test_torch_model'
    >>> test_id("..site-packages.vera_core.vera", "vera_core.vera.merge")
    'vera_core.vera.merge'
    """
    if not classname or "." in name.split("[")[0]:
        return name
    return f"{classname}::{name}"


def read_report(path: Path) -> Report:
    """The outcomes in a JUnit XML file written by ``pytest --junitxml``."""
    report = Report()
    for case in ET.parse(path).getroot().iter("testcase"):
        classname = case.get("classname", "")
        key = test_id(classname, case.get("name", ""))
        report.modules.add(classname or key)
        tags = {child.tag: child for child in case}
        if "failure" in tags or "error" in tags:
            report.failed.add(key)
        elif "skipped" in tags:
            skip = tags["skipped"]
            message = skip.get("message") or ""
            if message == "collection skipped":  # the reason is in the text: (path, line, 'Skipped: ...')
                message = (skip.text or "").rsplit("Skipped: ", 1)[-1].rstrip("')\"")
            report.skipped[key] = message
        else:
            report.passed.add(key)
    return report


def covers(collected: str, wanted: str) -> bool:
    """Whether the test id ``collected`` is ``wanted`` or one of its tests (``wanted`` a module)."""
    return collected == wanted or collected.startswith(f"{wanted}::")


def skipped_everywhere(reports: dict[str, Report]) -> dict[str, dict[str, str]]:
    """Test id -> {session: reason} for each test that no session ran, GPU-only skips left out.

    Examples
    --------
    >>> a, b = Report(passed={"t::x"}), Report(skipped={"t::x": "jax not installed", "t::y": "no bfloat16"})
    >>> skipped_everywhere({"a": a, "b": b})
    {'t::y': {'b': 'no bfloat16'}}
    >>> skipped_everywhere({"b": Report(skipped={"t::z": "torch-cuda: no CUDA device"})})
    {}
    """
    ran = set().union(*(report.passed | report.failed for report in reports.values()))
    where: defaultdict[str, dict[str, str]] = defaultdict(dict)
    for session, report in reports.items():
        for key, reason in report.skipped.items():
            where[key][session] = reason
    return {
        key: reasons
        for key, reasons in where.items()
        if not any(covers(done, key) for done in ran) and not all(GPU_REASON in r for r in reasons.values())
    }


def test_modules(tests: Path) -> list[str]:
    """The dotted paths of the test files under ``tests`` (``tests.core.test_rows``)."""
    root = tests.parent
    return sorted(".".join(path.relative_to(root).with_suffix("").parts) for path in tests.rglob("test_*.py"))


def doctest_modules(packages: dict[str, Path]) -> list[str]:
    """The dotted file paths (``vera_core.vera``, ``vera_core.__init__``) of the modules with a ``>>>``
    example, from package name -> source folder."""
    names = []
    for package, folder in packages.items():
        for path in folder.rglob("*.py"):
            if ">>>" in path.read_text(encoding="utf-8"):
                names.append(".".join((package, *path.relative_to(folder).with_suffix("").parts)))
    return sorted(names)


def uncollected(reports: dict[str, Report], modules: list[str]) -> list[str]:
    """The modules (test files, or modules with doctests) that no session collected.

    A module was collected when a JUnit class name is its dotted path, or ends with it
    (an installed module's path starts with its site-packages folder).

    Examples
    --------
    >>> r = {"s": Report(modules={"tests.a", ".nox.s.lib.site-packages.pkg.mod"})}
    >>> uncollected(r, ["tests.a", "tests.b", "pkg.mod", "pkg.other"])
    ['tests.b', 'pkg.other']
    """
    collected = set().union(*(report.modules for report in reports.values()))
    return [m for m in modules if not any(name == m or name.endswith(f".{m}") for name in collected)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", type=Path)
    parser.add_argument("--sessions", nargs="+", required=True)
    parser.add_argument("--tests", type=Path, required=True, help="the folder of test files")
    parser.add_argument("--package", action="append", default=[], metavar="NAME=FOLDER")
    args = parser.parse_args(argv)
    packages = dict(item.split("=", 1) for item in args.package)

    problems: list[str] = []
    reports: dict[str, Report] = {}
    print(f"{'session':<12} {'passed':>7} {'skipped':>8} {'failed':>7}")
    for session in args.sessions:
        xml, skipped = args.reports / f"{session}.xml", args.reports / f"{session}.skipped"
        if xml.exists():
            report = reports[session] = read_report(xml)
            print(f"{session:<12} {len(report.passed):>7} {len(report.skipped):>8} {len(report.failed):>7}")
            problems += [f"{session}: {key} failed" for key in sorted(report.failed)]
        elif skipped.exists():
            print(f"{session:<12} session skipped: {skipped.read_text().strip()}")
        else:
            print(f"{session:<12} no report")
            problems.append(f"{session}: wrote no report (did it fail before pytest ran?)")

    reasons = Counter((session, reason) for session, r in reports.items() for reason in r.skipped.values())
    if reasons:
        print("\nskip reasons (count, session, reason):")
        for (session, reason), count in sorted(reasons.items()):
            print(f"{count:>5}  {session:<10} {reason}")
    for key, where in sorted(skipped_everywhere(reports).items()):
        problems.append(f"{key} ran in no session: " + "; ".join(f"{s}: {r}" for s, r in where.items()))
    doctests = doctest_modules({name: Path(folder) for name, folder in packages.items()})
    for module in uncollected(reports, test_modules(args.tests) + doctests):
        problems.append(f"{module} was collected by no session")

    total = Counter()
    for report in reports.values():
        total.update(passed=len(report.passed), failed=len(report.failed), skipped=len(report.skipped))
    if problems:
        print("\nproblems:")
        for problem in problems:
            print(f"  {problem}")
    print(f"\ntotal: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
