"""Run every corpus case through one loader, in this process, and write what happened as JSON.

``python -m files.corpus_runner MANIFEST LOADER RESULTS MEMORY`` (from ``tests/``), started
by ``test_corpus.py``. The process first limits its own address space to ``MEMORY``
bytes (``RLIMIT_AS``), so an input that makes a loader allocate without bound ends in a
``MemoryError`` here, recorded as a failure, instead of exhausting the machine. Each case
has 30 seconds (``SIGALRM``); a hang is recorded, not waited for. For each case the
record holds the exception (class, base classes, message, and the traceback when it is
not an ``AdapterFileError``), the time taken, and whether the input, the model or
weights, and any pre-existing output were left bit-identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import resource
import shutil
import signal
import stat
import sys
import time
import traceback
from pathlib import Path
from typing import Any

CASE_SECONDS = 30
SENTINEL = b"the previous output, which a failure must leave alone\n"


class HangError(Exception):
    """A case ran past :data:`CASE_SECONDS`."""


def _alarm(signum: int, frame: Any) -> None:
    raise HangError(f"no answer within {CASE_SECONDS} s")


def snapshot(path: Path) -> dict[str, str]:
    """SHA-256 of every regular file at ``path`` (a file or a folder, recursively); others by kind only."""
    found: dict[str, str] = {}
    try:
        info = path.lstat()
    except OSError:
        return {"": "missing"}
    if stat.S_ISREG(info.st_mode):
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not stat.S_ISDIR(info.st_mode):
        return {"": f"mode {stat.S_IFMT(info.st_mode)}"}
    for entry in sorted(path.rglob("*")):
        found[str(entry.relative_to(path))] = snapshot(entry)[""] if not entry.is_dir() else "folder"
    return found


def _error_record(error: BaseException) -> dict[str, Any]:
    from vera_core.errors import AdapterFileError

    return {
        "error": type(error).__name__,
        "bases": [cls.__name__ for cls in type(error).__mro__],
        "message": str(error),
        "traceback": None if isinstance(error, AdapterFileError) else traceback.format_exc(),
    }


def run_python(loader: str, entry: dict[str, Any]) -> dict[str, Any]:
    """``core``, ``numpy`` or ``torch`` on one case."""
    from files import craft

    path = Path(entry["path"])
    record: dict[str, Any] = {"error": None, "model_unchanged": None}
    if loader == "core":
        from vera_core.loading import read_adapter

        def call() -> None:
            adapter = read_adapter(path)
            adapter.projections(max_in=None if adapter.config.max_in is not None else craft.MAX_IN)

        state = None
    elif loader == "numpy":
        import numpy as np

        import vera_numpy as vn

        weights = craft.base_weights()
        state = {k: v.copy() for k, v in weights.items()}

        def call() -> None:
            vn.AdaptedModel.load(path, weights)

        def unchanged() -> bool:
            return weights.keys() == state.keys() and all(np.array_equal(weights[k], state[k]) for k in state)

    else:
        import torch

        import vera_torch as vt

        model = craft.torch_model()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        structure = [(name, type(module).__name__) for name, module in model.named_modules()]
        load = vt.load_peft_adapter if entry["kind"] == "peft" else vt.load_adapter

        def call() -> None:
            load(model, path)

        def unchanged() -> bool:
            now = model.state_dict()
            same_structure = [(name, type(module).__name__) for name, module in model.named_modules()] == structure
            same_values = now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
            return same_structure and same_values and not hasattr(model, "vera_state")

    try:
        call()
    except Exception as error:  # everything is recorded; test_corpus.py judges it
        record.update(_error_record(error))
        if state is not None:
            record["model_unchanged"] = unchanged()
    return record


def _sentinel_output(workdir: Path, command: str, kind: str) -> Path | None:
    if command == "merge":
        output = workdir / "merged.safetensors"
        output.write_bytes(SENTINEL)
        return output
    if command == "convert":
        if kind == "peft":
            output = workdir / "converted.safetensors"
            output.write_bytes(SENTINEL)
        else:
            output = workdir / "converted"
            output.mkdir()
            (output / "adapter_config.json").write_bytes(SENTINEL)
            (output / "adapter_model.safetensors").write_bytes(SENTINEL)
        return output
    return None


def run_cli(command: str, entry: dict[str, Any], workdir: Path, base: Path) -> dict[str, Any]:
    """One ``vera`` subcommand on one case, through ``vera_cli.main.main`` (stdout/stderr captured)."""
    from files import craft
    from vera_cli.main import main

    path = Path(entry["path"])
    workdir.mkdir(parents=True)
    output = _sentinel_output(workdir, command, entry["kind"])
    argv = {
        "inspect": ["inspect", str(path)],
        "merge": ["merge", "--base", str(base), "--adapter", str(path), "-o", str(output)],
        "convert": ["convert", str(path), str(output)]
        + (["--max-in", str(craft.MAX_IN)] if entry["kind"] == "peft" else []),
    }[command]
    before_output = snapshot(output) if output is not None else None
    before_base = snapshot(base)
    stdout, stderr = io.StringIO(), io.StringIO()
    record: dict[str, Any] = {"error": None}
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            record["code"] = main(argv)
    except BaseException as error:
        record.update(_error_record(error))
        record["code"] = None
    record["stderr"] = stderr.getvalue()
    record["output_unchanged"] = None if output is None else snapshot(output) == before_output
    record["base_unchanged"] = snapshot(base) == before_base
    record["stray"] = sorted(p.name for p in workdir.iterdir() if p.name.startswith("."))
    shutil.rmtree(workdir, ignore_errors=True)
    return record


def sweep() -> dict[str, Any]:
    """Every single-bit flip of a valid vera-core file through ``read_adapter`` (and its projections)."""
    import tempfile

    from files import craft
    from vera_core.errors import AdapterFileError
    from vera_core.loading import read_adapter

    data = craft.ours()
    accepted, internal = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "flipped.safetensors"
        for bit in range(len(data) * 8):
            flipped = bytearray(data)
            flipped[bit // 8] ^= 1 << (bit % 8)
            path.write_bytes(flipped)
            try:
                read_adapter(path).projections()
                accepted.append(bit)
            except AdapterFileError:
                pass
            except Exception:
                internal.append((bit, traceback.format_exc()))
    return {
        "bits": len(data) * 8,
        "accepted": accepted,
        "internal": internal[:5],
        "seconds": time.perf_counter() - start,
    }


def main(manifest_path: str, loader: str, results_path: str, memory: str) -> None:
    """Run ``loader`` over every case of the manifest; write the records to ``results_path``."""
    resource.setrlimit(resource.RLIMIT_AS, (int(memory), int(memory)))
    signal.signal(signal.SIGALRM, _alarm)
    manifest = json.loads(Path(manifest_path).read_text())
    from vera_core.generators import torch_available

    if torch_available():  # imported before the clock starts (PEFT's generator needs it)
        import torch  # noqa: F401
    import vera_cli.main  # noqa: F401
    import vera_numpy  # noqa: F401

    results_dir = Path(results_path).with_suffix("")
    from files import craft

    base = results_dir / "base.safetensors"
    results_dir.mkdir(parents=True, exist_ok=True)
    base.write_bytes(craft.base_file())
    records = {}
    for name, entry in manifest.items():
        before = snapshot(Path(entry["path"]))
        start = time.perf_counter()
        signal.alarm(CASE_SECONDS)
        try:
            if loader in ("core", "numpy", "torch"):
                record = run_python(loader, entry)
            else:
                record = run_cli(loader, entry, results_dir / name, base)
        except HangError as error:
            record = _error_record(error)
        finally:
            signal.alarm(0)
        record["seconds"] = time.perf_counter() - start
        record["input_unchanged"] = snapshot(Path(entry["path"])) == before
        records[name] = record
    if loader == "core":
        records["__sweep__"] = sweep()
    Path(results_path).write_text(json.dumps(records))


if __name__ == "__main__":
    main(*sys.argv[1:])
