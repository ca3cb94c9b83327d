"""The corruption corpus (:mod:`.corpus`) through every loader: each refusal specific, bounded, harmless.

The corpus is generated once per session; each loader runs over all of it in a
subprocess of its own (:mod:`.corpus_runner`) under a 3 GiB address-space limit, all
six at once. The checks, per case and loader:

* Python loaders (``core``: :func:`vera_core.loading.read_adapter` and its projections,
  ``numpy``: ``vera_numpy.AdaptedModel.load``, ``torch``: ``vera_torch.load_adapter`` /
  ``load_peft_adapter``) raise the case's exception class (exactly, or a subclass where
  the first failing check depends on the corruption), with the field named where the
  case says, and never anything but an ``AdapterFileError``;
* the CLI commands (``inspect``, ``merge``, ``convert``) exit 1 with one line on stderr,
  ``vera COMMAND: error: ...``, no traceback, no "internal error";
* valid controls load everywhere (exit 0);
* every case takes under :data:`SECONDS`; the input file or folder, the weights or torch
  model, the base file and any previous output are bit-identical afterwards, and no
  temporary file is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from vera_core.generators import torch_available

from . import corpus

SECONDS = 10.0
"""The most one case may take (the slowest valid ones take about 0.1 s; CI machines are slow)."""
MEMORY = 3 << 30
TESTS = Path(__file__).resolve().parents[1]

HAVE_TORCH = torch_available()

CLI = ("inspect", "merge", "convert")
RUN = [loader for loader in corpus.LOADERS if loader != "torch" or HAVE_TORCH]


@pytest.fixture(scope="session")
def corpus_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The manifest, and each loader's records (all loaders run at once, each in its own process)."""
    root = tmp_path_factory.mktemp("corpus")
    manifest = corpus.build_all(root / "cases", torch=HAVE_TORCH)
    manifest_path = root / "manifest.json"
    manifest_path.write_text(json.dumps(manifest))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *(p for p in sys.path if p)])}
    processes = {}
    for loader in RUN:
        command = [sys.executable, "-m", "files.corpus_runner", str(manifest_path), loader]
        command += [str(root / f"{loader}.json"), str(MEMORY)]
        processes[loader] = subprocess.Popen(command, cwd=TESTS, env=env, stderr=subprocess.PIPE, text=True)
    records = {}
    for loader, process in processes.items():
        _, err = process.communicate(timeout=900)
        assert process.returncode == 0, f"the {loader} runner failed:\n{err[-4000:]}"
        records[loader] = json.loads((root / f"{loader}.json").read_text())
    return manifest, records


def _python_problems(loader: str, name: str, entry: dict[str, Any], record: dict[str, Any]) -> list[str]:
    expected = entry["expected"][loader]
    if record.get("traceback"):
        return [f"internal error:\n{record['traceback']}"]
    if expected is None:
        return [] if record["error"] is None else [f"refused a valid input: {record['error']}: {record['message']}"]
    if record["error"] is None:
        return [f"accepted; expected {expected}"]
    problems = []
    matches = record["error"] == expected if entry["exact"] else expected in record["bases"]
    if not matches:
        problems.append(f"raised {record['error']} ({record['message']}); expected {expected}")
    if entry["keyword"] and entry["keyword"] not in record["message"]:
        problems.append(f"message does not name {entry['keyword']!r}: {record['message']}")
    if "\n" in record["message"]:
        problems.append(f"message of several lines: {record['message']!r}")
    if record["model_unchanged"] is False:
        problems.append("the weights or model changed")
    return problems


def _cli_problems(loader: str, name: str, entry: dict[str, Any], record: dict[str, Any]) -> list[str]:
    expected = entry["expected"][loader]
    err = record["stderr"]
    if record.get("traceback"):
        return [f"raised out of main:\n{record['traceback']}"]
    if expected is None:
        return [] if record["code"] == 0 else [f"exit {record['code']} for a valid input: {err}"]
    problems = []
    if record["code"] != 1:
        problems.append(f"exit {record['code']}, expected 1")
    if not (err.startswith(f"vera {loader}: error: ") and err.count("\n") == 1):
        problems.append(f"not one error line: {err!r}")
    if "Traceback" in err or "internal error" in err:
        problems.append(f"an internal error: {err!r}")
    if record["output_unchanged"] is False:
        problems.append("the previous output changed")
    if not record["base_unchanged"]:
        problems.append("the base file changed")
    if record["stray"]:
        problems.append(f"temporaries left: {record['stray']}")
    return problems


@pytest.mark.parametrize("loader", RUN)
def test_every_case(corpus_run: tuple[dict[str, Any], dict[str, dict[str, Any]]], loader: str) -> None:
    manifest, records = corpus_run
    judge = _cli_problems if loader in CLI else _python_problems
    failures = []
    for name, entry in manifest.items():
        record = records[loader][name]
        problems = judge(loader, name, entry, record)
        if record["seconds"] > SECONDS:
            problems.append(f"took {record['seconds']:.1f} s")
        if not record["input_unchanged"]:
            problems.append("the input changed")
        failures += [f"{name}: {problem}" for problem in problems]
    assert not failures, f"{len(failures)} problems:\n" + "\n".join(failures)


def test_every_single_bit_flip_is_refused(corpus_run: tuple[dict[str, Any], dict[str, dict[str, Any]]]) -> None:
    sweep = corpus_run[1]["core"]["__sweep__"]
    assert sweep["bits"] > 8000
    assert not sweep["internal"], sweep["internal"]
    assert sweep["accepted"] == [], f"flips of bits {sweep['accepted'][:20]} were accepted"


def test_the_corpus_covers_every_category(corpus_run: tuple[dict[str, Any], dict[str, dict[str, Any]]]) -> None:
    """The counts asked for in issue 12's closing note, and a floor under each category."""
    manifest, records = corpus_run
    prefixes = Counter(name.split("-")[0] for name in manifest)
    counts = {
        "cases": len(manifest),
        "valid controls": sum(1 for entry in manifest.values() if entry["expected"]["core"] is None),
        "loader runs": sum(len(records[loader]) - (loader == "core") for loader in records),
        "bit flips swept": records["core"]["__sweep__"]["bits"],
    }
    print(json.dumps({"categories": prefixes, **counts}, indent=1))
    assert counts["cases"] >= 300
    for prefix in ("truncated", "bit", "config", "layer", "metadata", "container", "tensor", "budget", "peft"):
        assert prefixes[prefix] >= 3, prefix
