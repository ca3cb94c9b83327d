"""``vera demo`` in its quick size: every output exists and VeRA learns the new task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vera_cli.main import main

from .cli_helpers import read_tensors

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def test_quick_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "VeRA" in printed and "DVoRA" in printed and "LoRA" in printed and "Full fine-tuning" in printed
    for name in (
        "results.json",
        "results.md",
        "accuracy_vs_parameters.png",
        "base.safetensors",
        "full.safetensors",
        "lora.safetensors",
        "vera.safetensors",
        "dvora.safetensors",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "accuracy_vs_parameters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = {r["method"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert list(results) == ["full", "lora", "vera", "dvora"]
    vera = results["vera"]
    assert vera["accuracy_after"] > vera["accuracy_before"]
    assert vera["file_bytes"] == (out / "vera.safetensors").stat().st_size
    assert vera["trainable_parameters"] < results["lora"]["trainable_parameters"]
    assert results["lora"]["trainable_parameters"] < results["full"]["trainable_parameters"]
    assert f"{vera['trainable_parameters']:,}" in printed

    config, tensors = read_tensors(out / "vera.safetensors")
    assert config.method == "vera" and sorted(config.layers) == ["fc1", "fc2", "head"]
    assert sum(v.size for v in tensors.values()) == vera["trainable_parameters"]
    assert main(["inspect", str(out / "vera.safetensors")]) == 0
    merged = tmp_path / "merged.safetensors"
    assert (
        main(
            [
                "merge",
                "--base",
                str(out / "base.safetensors"),
                "--adapter",
                str(out / "vera.safetensors"),
                "-o",
                str(merged),
            ]
        )
        == 0
    )
    assert merged.exists() and np.isfinite(json.loads((out / "results.json").read_text())["pretrained_accuracy"])


def test_demo_subset_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--methods", "vera", "--out", str(out)]) == 0
    assert [r["method"] for r in json.loads((out / "results.json").read_text())["results"]] == ["vera"]
    assert not (out / "lora.safetensors").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--methods", "vera,adapterX"])
    assert exit_info.value.code == 2
    capsys.readouterr()


def test_demo_cupy_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a CUDA GPU is present")
    except Exception:  # CuPy missing, or no driver: the case under test
        pass
    assert main(["demo", "--backend", "cupy", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "cupy" in err.lower() and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_quick_demo_on_torch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "demo"
    assert main(["demo", "--backend", "torch", "--quick", "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    results = {r["method"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert results["vera"]["accuracy_after"] > results["vera"]["accuracy_before"]
    config, _ = read_tensors(out / "vera.safetensors")
    assert sorted(config.layers) == ["fc1", "fc2", "head"]
    assert main(["inspect", str(out / "vera.safetensors")]) == 0
    assert "[OK]" in capsys.readouterr().out
