"""The demo's results: one row per method, printed as a table and written as JSON and Markdown."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from vera_core.atomic import write_file


@dataclasses.dataclass(frozen=True)
class Result:
    """What one adaptation run measured."""

    method: str
    label: str
    trainable_parameters: int
    file: str
    file_bytes: int
    accuracy_before: float
    accuracy_after: float
    seconds: float


HEADERS = ("method", "trainable params", "file bytes", "acc. before", "acc. after", "seconds")


def rows(results: Sequence[Result]) -> list[tuple[str, ...]]:
    """The table's cells as strings."""
    return [
        (
            r.label,
            f"{r.trainable_parameters:,}",
            f"{r.file_bytes:,}",
            f"{100 * r.accuracy_before:.1f}%",
            f"{100 * r.accuracy_after:.1f}%",
            f"{r.seconds:.2f}",
        )
        for r in results
    ]


def markdown(results: Sequence[Result]) -> str:
    """A Markdown table (numbers right-aligned).

    Examples
    --------
    >>> print(markdown([Result("vera", "VeRA", 10, "v.safetensors", 99, 0.1, 0.9, 1.0)]))
    | method | trainable params | file bytes | acc. before | acc. after | seconds |
    |:--|--:|--:|--:|--:|--:|
    | VeRA | 10 | 99 | 10.0% | 90.0% | 1.00 |
    """
    lines = ["| " + " | ".join(HEADERS) + " |", "|:--" + "|--:" * (len(HEADERS) - 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(results)]
    return "\n".join(lines)


def plain(results: Sequence[Result]) -> str:
    """A fixed-width text table."""
    table = [HEADERS, *rows(results)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADERS))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells)

    return "\n".join([line(HEADERS), "  ".join("-" * w for w in widths), *(line(row) for row in rows(results))])


def write(results: Sequence[Result], out: Path, context: dict[str, object]) -> tuple[Path, Path]:
    """Write ``results.json`` (with ``context``) and ``results.md`` into ``out``, atomically."""
    json_path, md_path = out / "results.json", out / "results.md"
    payload = json.dumps({**context, "results": [dataclasses.asdict(r) for r in results]}, indent=2)
    write_file(json_path, lambda tmp: Path(tmp).write_text(payload + "\n"))
    write_file(md_path, lambda tmp: Path(tmp).write_text(markdown(results) + "\n"))
    return json_path, md_path
