"""Hypothesis fuzzing of :func:`vera_core.read_adapter` with file contents: only AdapterFileError, ever.

Random bytes, and valid vera-core files and PEFT weights with a few bytes overwritten
or cut: every one is read (and its projections obtained) or refused with an
``AdapterFileError``; nothing else escapes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vera_core as vc

from . import craft


def _read(write: object) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder))  # type: ignore[operator]
        try:
            adapter = vc.read_adapter(path)
            adapter.projections(max_in=None if adapter.config.max_in is not None else craft.MAX_IN)
        except vc.AdapterFileError:
            pass


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(content=st.binary(max_size=4096))
def test_random_bytes(content: bytes) -> None:
    def write(folder: Path) -> Path:
        (folder / "a.safetensors").write_bytes(content)
        return folder / "a.safetensors"

    _read(write)


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with up to 4 runs of random bytes overwritten, then maybe cut short."""
    damaged = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, len(damaged) - 1))
        run = draw(st.binary(min_size=1, max_size=8))
        damaged[start : start + len(run)] = run
    if draw(st.booleans()):
        damaged = damaged[: draw(st.integers(0, len(damaged)))]
    return bytes(damaged)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(content=damaged(craft.ours()))
def test_damaged_vera_core_files(content: bytes) -> None:
    def write(folder: Path) -> Path:
        (folder / "a.safetensors").write_bytes(content)
        return folder / "a.safetensors"

    _read(write)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    weights=damaged(craft.peft_weights_with_digest()), config=damaged(craft.json.dumps(craft.peft_config()).encode())
)
def test_damaged_peft_folders(weights: bytes, config: bytes) -> None:
    def write(folder: Path) -> Path:
        peft = craft.peft_folder(folder / "peft", weights=weights)
        (peft / "adapter_config.json").write_bytes(config)
        return peft

    _read(write)
