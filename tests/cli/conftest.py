"""Fixtures for the command-line tests: small synthetic adapter files and base weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from vera_core.adapter_file import save_adapter_file

from .cli_helpers import make_adapter, make_base


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Paths of a base file and of VeRA, DVoRA and stored-projection adapters over it."""
    rng = np.random.default_rng(0)
    base = make_base(rng)
    paths = {
        "base": tmp_path / "base.safetensors",
        "vera": tmp_path / "vera.safetensors",
        "dvora": tmp_path / "dvora.safetensors",
        "stored": tmp_path / "stored.safetensors",
    }
    save_file(base, str(paths["base"]))
    save_adapter_file(paths["vera"], *make_adapter(rng, base))
    save_adapter_file(paths["dvora"], *make_adapter(rng, base, "dvora"))
    save_adapter_file(paths["stored"], *make_adapter(rng, base, store=True))
    return paths
