"""The pure-Python reimplementation of docs/projection-spec.md against the generator and the document."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vera_core import PRNG_ID, PRNG_VERSION, generate_projections
from vera_core.testing import spec

from .host import bits

SPEC = Path(__file__).resolve().parents[2] / "docs" / "projection-spec.md"


def _table(heading: str, first_column: str) -> list[dict[str, str]]:
    """The rows of the first markdown table after ``heading`` whose header starts with ``first_column``."""
    text = SPEC.read_text().split(heading, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    header = next(i for i, line in enumerate(lines) if line.strip("| ").startswith(first_column))
    names = [cell.strip() for cell in lines[header].strip("|").split("|")]
    rows = []
    for line in lines[header + 2 :]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) != len(names):
            break
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


def test_document_names_the_implemented_stream() -> None:
    text = SPEC.read_text()
    assert f"`{PRNG_ID}`" in text and f"| stream layout version | `{PRNG_VERSION}`" in text


@pytest.mark.parametrize(("counter", "key", "expected"), spec.KNOWN_ANSWERS)
def test_oracle_threefry_known_answers(
    counter: tuple[int, int], key: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert spec.threefry2x32_20(key, counter) == expected


def test_document_threefry_vectors_are_random123s() -> None:
    def pair(cell: str) -> tuple[int, int]:
        first, second = cell.strip("()").split(",")
        return int(first, 16), int(second, 16)

    rows = _table("## 1. Threefry-2x32-20", "counter")
    assert [(pair(r["counter (x0, x1)"]), pair(r["key (k0, k1)"]), pair(r["output"])) for r in rows] == list(
        spec.KNOWN_ANSWERS
    )


@pytest.mark.parametrize("row", _table("## Known answers", "matrix"), ids=lambda r: f"{r['matrix']}[{r['i']},{r['j']}]")
def test_document_known_answers(row: dict[str, str]) -> None:
    matrix, i, j, fan_in = "AB".index(row["matrix"]), int(row["i"]), int(row["j"]), int(row["fan_in"])
    assert spec.element_words(0, matrix, i, j) == (int(row["w0"], 16), int(row["w1"], 16))
    A, B = generate_projections(0, r=4, max_in=8, max_out=6, xp=np)
    A64, B64 = generate_projections(0, r=4, max_in=8, max_out=6, xp=np, dtype=np.float64)
    for dtype, generated in (("float32", (A, B)), ("float64", (A64, B64))):
        documented = float.fromhex(row[f"{dtype} (hex)"])
        assert documented == spec.element(0, matrix, i, j, fan_in, dtype)
        assert float(generated[matrix][i, j]) == documented
        assert float(row[dtype]) == pytest.approx(documented, rel=10 * float(np.finfo(dtype).eps))


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("seed", [0, 1, 2**32, 2**64 - 1])
def test_generator_is_the_specified_stream(seed: int, dtype: str) -> None:
    A, B = generate_projections(seed, r=5, max_in=9, max_out=7, xp=np, dtype=np.dtype(dtype))
    want_A, want_B = spec.projections(seed, 5, 9, 7, dtype)
    np.testing.assert_array_equal(bits(A), bits(np.asarray(want_A, dtype=dtype)))
    np.testing.assert_array_equal(bits(B), bits(np.asarray(want_B, dtype=dtype)))
