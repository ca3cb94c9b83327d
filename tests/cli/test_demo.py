"""``vera demo`` in its quick size: every output exists and VeRA learns the new task."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from vera_cli.demo.plot import accuracy_range, plot
from vera_cli.demo.report import Result
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


def test_demo_cupy_without_cupy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` fails, as where it is not installed
    assert main(["demo", "--backend", "cupy", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "cupy" in err.lower() and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.requires("torch")
def test_quick_demo_on_torch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--backend", "torch", "--quick", "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    results = {r["method"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert results["vera"]["accuracy_after"] > results["vera"]["accuracy_before"]
    config, _ = read_tensors(out / "vera.safetensors")
    assert sorted(config.layers) == ["fc1", "fc2", "head"]
    assert main(["inspect", str(out / "vera.safetensors")]) == 0
    assert "[OK]" in capsys.readouterr().out


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    quick = ["demo", "--quick", "--methods", "vera"]
    assert main([*quick, "--out", str(tmp_path / "piped")]) == 0
    piped = capsys.readouterr()
    assert piped.err == "" and "\r" not in piped.out  # captured streams are no terminal
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([*quick, "--out", str(tmp_path / "terminal")]) == 0
    assert "pretraining" in terminal.getvalue() and "\r" in terminal.getvalue()
    silenced = Terminal()
    monkeypatch.setattr(sys, "stderr", silenced)
    assert main([*quick, "--no-progress", "--out", str(tmp_path / "silenced")]) == 0
    assert silenced.getvalue() == ""


def test_plot_zooms_to_the_results_and_labels_the_before_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib import pyplot as plt

    close = plt.close
    figures: list[object] = []
    monkeypatch.setattr(plt, "close", figures.append)
    results = [
        Result("full", "Full fine-tuning", 26122, "full.safetensors", 1, 0.096, 0.970, 0.2),
        Result("vera", "VeRA (r=128)", 650, "vera.safetensors", 1, 0.096, 0.915, 0.4),
    ]
    plot(results, tmp_path / "plot.png", title="t")
    (figure,) = figures
    try:
        top = figure.axes[0]
        low, high = top.get_ylim()
        assert (low, high) == accuracy_range([100 * r.accuracy_after for r in results])
        assert 90 < low < 91.5 and 97 < high < 99
        texts = [text.get_text() for axes in figure.axes for text in axes.texts]
        assert "before adaptation: 9.6%" in texts
        assert "VeRA (r=128): 91.5%" in texts and "Full fine-tuning: 97.0%" in texts
    finally:
        close(figure)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
