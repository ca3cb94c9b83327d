"""``vera demo --tenants N`` in its quick size: every output exists, and each user's files reproduce its results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import vera_numpy as vn
from vera_cli.demo import data
from vera_cli.demo.tenants import make_users
from vera_cli.main import main
from vera_core import read_adapter

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

USERS = 12


def _run(tmp_path: Path, *extra: str) -> tuple[Path, dict]:
    out = tmp_path / "demo"
    assert main(["demo", "--tenants", str(USERS), "--quick", "--out", str(out), *extra]) == 0
    return out, json.loads((out / "tenants.json").read_text())


def _user_accuracy(out: Path, user: int, name: str) -> float:
    """The user's accuracy recomputed from its file alone, through the single-adapter path (not the bank)."""
    from safetensors.numpy import load_file

    weights = load_file(str(out / "tenants_base.safetensors"))
    halves = data.load_halves(0, limit=1000)
    users = make_users(halves.adapt, USERS, 64, np.random.default_rng(1))
    model = vn.AdaptedModel.load(out / "tenants" / f"{name}.safetensors", weights)
    net = vn.Sequential(
        {n: model.layer(n) if n[0] != "r" else vn.ReLU() for n in ("fc1", "relu1", "fc2", "relu2", "head")}
    )
    return vn.accuracy(net.eval().forward(users.x_test[user]), users.y_test)


def test_quick_tenants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = _run(tmp_path)  # progress bars asked for, but stderr is no terminal: none
    captured = capsys.readouterr()
    assert captured.err == ""
    assert f"{USERS} users" in captured.out and "per-user test accuracy" in captured.out
    assert (out / "tenants.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| per-user test accuracy |" in (out / "tenants.md").read_text()
    assert report["users"] == USERS and report["backend"] == "numpy"
    assert len(report["accuracy_before"]) == len(report["accuracy_after"]) == len(report["angles"]) == USERS
    q = report["quantiles"]
    assert q["after"][3] > q["before"][3]  # the median user gains
    before, after = np.asarray(report["accuracy_before"]), np.asarray(report["accuracy_after"])
    assert np.mean(after) > np.mean(before) + 0.1
    assert all(-180 <= a < 180 for a in report["angles"])
    # hand count for MLP 64-32-32-10, r=32: VeRA (32+32) + (32+32) + (32+10) floats, LoRA r=4 4*(96+64+42)
    assert report["bytes"]["vera"] == USERS * 170 * 4
    assert report["bytes"]["lora"] == USERS * 4 * (96 + 64 + 42) * 4
    assert report["bytes"]["full_copies"] == USERS * (64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10) * 4
    files = sorted((out / "tenants").glob("*.safetensors"))
    assert [f.stem for f in files] == [f"user{u:02d}" for u in range(USERS)]
    assert report["bytes"]["vera_files"] == sum(f.stat().st_size for f in files)
    adapter = read_adapter(files[0])
    config, tensors = adapter.config, adapter.vectors
    assert config.method == "vera" and config.r == 32 and sorted(config.layers) == ["fc1", "fc2", "head"]
    assert sum(v.size for v in tensors.values()) == 170
    for user in (0, USERS - 1):
        assert _user_accuracy(out, user, files[user].stem) == pytest.approx(report["accuracy_after"][user], abs=1e-9)
    rates = report["serving"]["rows_per_second"]
    assert set(rates) == {"base", "one adapter", "mixed"} and all(r > 0 for r in rates.values())
    assert main(["inspect", str(files[0])]) == 0


@pytest.mark.requires("torch")
def test_tenants_on_torch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = _run(tmp_path, "--backend", "torch", "--no-progress")
    capsys.readouterr()
    assert report["backend"] == "torch" and report["quantiles"]["after"][3] > report["quantiles"]["before"][3]
    name = sorted((out / "tenants").glob("*.safetensors"))[3].stem
    assert _user_accuracy(out, 3, name) == pytest.approx(report["accuracy_after"][3], abs=1e-9)


def test_tenants_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--tenants", "5", "--methods", "vera", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "--methods does not apply" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--tenants", "0"])
    assert exit_info.value.code == 2
    capsys.readouterr()
