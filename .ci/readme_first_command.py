"""Run the README's first command, literally, in a copy of this checkout, and check what it made.

The command is read from README.md (its first ``console`` block), so the two never drift.
It runs in a temporary copy of the checkout's files (tracked and untracked, git-ignored
ones left out: what a fresh clone has), with the ``python3`` on ``PATH``, and must:

- print the demo's table: a header, a rule and one row per method;
- leave its output clean when piped (no progress bars);
- write a PNG that decodes, and VeRA and DVoRA adapter files that ``vera inspect``
  accepts with their projections verified;

and the README's other ``vera`` commands (the command-line block) must succeed on those
outputs. Exit 1 with the reason otherwise. Usage: ``python .ci/readme_first_command.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("Full fine-tuning", "LoRA", "VeRA", "DVoRA")
HEADER = re.compile(r"^method\s+trainable params\s+file bytes\s+acc\. before\s+acc\. after\s+seconds$")


class ReadmeError(Exception):
    """What the README's command did wrong."""


def console_blocks(readme: str) -> list[list[str]]:
    """The lines of each ``console`` block of the README, comments after ``#`` removed.

    Examples
    --------
    >>> console_blocks("x\\n```console\\na && b   # note\\n\\nc\\n```\\n```python\\nd\\n```")
    [['a && b', 'c']]
    """
    blocks = re.findall(r"```console\n(.*?)```", readme, flags=re.DOTALL)
    return [[line.split("  #")[0].strip() for line in block.splitlines() if line.strip()] for block in blocks]


def copy_checkout(target: Path) -> None:
    """Copy the files a fresh clone would have (tracked, and untracked but not ignored) into ``target``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted from the working tree is still listed
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


def check_table(stdout: str) -> list[str]:
    """The table's rows, or ReadmeError when the printed table lacks its header, rule or a method.

    Examples
    --------
    >>> rows = check_table("x\\nmethod  trainable params  file bytes  acc. before  acc. after  seconds\\n--  --\\n"
    ...     "Full fine-tuning  1  2  9.6%  97.0%  0.21\\nLoRA (r=4)  1  2  9.6%  95.6%  0.17\\n"
    ...     "VeRA (r=128)  1  2  9.6%  91.5%  0.38\\nDVoRA (r=128)  1  2  9.6%  95.6%  0.59\\n")
    >>> len(rows)
    4
    """
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if HEADER.match(line.strip())), None)
    if start is None:
        raise ReadmeError("no table header in the output")
    rows = lines[start + 2 : start + 2 + len(METHODS)]
    if not set(lines[start + 1]) <= {"-", " "} or len(rows) != len(METHODS):
        raise ReadmeError(f"the table has no rule or too few rows: {lines[start : start + 6]}")
    for method, row in zip(METHODS, rows, strict=True):
        if not row.startswith(method) or len(re.findall(r"\d+\.\d%", row)) != 2:
            raise ReadmeError(f"row {row!r} is not {method}'s, with accuracies before and after")
    return rows


def run(command: str, cwd: Path, env_path: str | None = None) -> subprocess.CompletedProcess[str]:
    """``bash -c command`` in ``cwd`` (``env_path`` put in front of PATH); ReadmeError unless it exits 0."""
    env = None if env_path is None else {**os.environ, "PATH": f"{env_path}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ReadmeError(f"{command!r} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def check(copy: Path) -> None:
    """Run the README's first command in ``copy`` and check its outputs (ReadmeError otherwise)."""
    blocks = console_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    (command,) = blocks[0]
    print(f"$ {command}   (in {copy})", flush=True)
    started = time.perf_counter()
    result = run(command, copy)
    print(result.stdout[result.stdout.find("pretrained MLP") :], flush=True)
    print(f"the README's first command took {time.perf_counter() - started:.0f} s", flush=True)

    check_table(result.stdout)
    piped = result.stdout + result.stderr
    if "\r" in piped or "step/s" in piped:
        raise ReadmeError(f"progress bars in piped output:\n{result.stderr[-2000:]}")
    out, venv_bin = copy / "vera-demo-output", copy / ".venv" / "bin"
    png = out / "accuracy_vs_parameters.png"
    size = run(
        f"{venv_bin}/python -c \"from PIL import Image; im = Image.open('{png}'); im.load(); print(im.size)\"", copy
    )
    print(f"{png.name}: a PNG of {size.stdout.strip()} pixels", flush=True)
    for name in ("vera.safetensors", "dvora.safetensors"):
        report = json.loads(run(f"{venv_bin}/vera inspect --json {out / name}", copy).stdout)
        if report["projections"]["verified"] is not True:
            raise ReadmeError(f"vera inspect {name}: projections not verified: {report['projections']}")
        print(f"vera inspect {name}: {report['method']}, projections verified", flush=True)
    for line in (line for block in blocks[1:] for line in block):
        if line.startswith("vera ") and not line.startswith("vera demo"):
            print(f"$ {line}", flush=True)
            run(line, copy, env_path=str(venv_bin))


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="vera-readme-") as tmp:
        copy = Path(tmp) / "vera-core"
        copy_checkout(copy)
        try:
            check(copy)
        except ReadmeError as failure:
            print(f"README's first command: {failure}", file=sys.stderr)
            return 1
    print("README's first command: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
