"""``vera inspect``, ``vera merge`` and ``vera convert`` on small synthetic files."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vera_cli.main import main
from vera_core import dvora_merge, generate_projections, merge
from vera_core.adapter_file import AdapterConfig, LayerSpec, projection_checksum, save_adapter_file
from vera_core.safetensors_file import write as write_safetensors

from .cli_helpers import LAYERS, SEED, R, read_tensors


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str) -> None:
    assert err.count("\n") == 1 and err.startswith("vera ") and "Traceback" not in err


def projections_of(tensors: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return tensors["projections.A"], tensors["projections.B"]


def projections() -> tuple[np.ndarray, np.ndarray]:
    max_in = max(i for _, i, _ in LAYERS.values())
    max_out = max(o for o, _, _ in LAYERS.values())
    return generate_projections(SEED, R, max_in, max_out, xp=np)


# ---------------------------------------------------------------- inspect


@pytest.mark.parametrize("kind", ["vera", "dvora", "stored"])
def test_inspect_reports_and_verifies(files: dict[str, Path], capsys: pytest.CaptureFixture[str], kind: str) -> None:
    code, out, _ = run_cli(capsys, "inspect", files[kind], "--json")
    assert code == 0
    report = json.loads(out)
    _, tensors = read_tensors(files[kind])
    assert report["r"] == R and report["seed"] == SEED and report["prng_id"] == "threefry2x32-20"
    assert report["method"] == ("dvora" if kind == "dvora" else "vera")
    assert [layer["name"] for layer in report["layers"]] == list(LAYERS)
    vectors = sum(v.size for k, v in tensors.items() if not k.startswith("projections."))
    assert report["trainable_parameters"] == vectors
    assert report["projections"] == {
        "stored": kind == "stored",
        "verified": True,
        "detail": report["projections"]["detail"],
    }
    code, text, _ = run_cli(capsys, "inspect", files[kind])
    assert code == 0 and "[OK]" in text and "enc.fc2" in text


def test_inspect_detects_wrong_stored_projections(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config, tensors = read_tensors(files["stored"])
    tensors["projections.A"] = tensors["projections.A"] * 1.5
    bad = tmp_path / "bad.safetensors"
    save_adapter_file(bad, config, tensors)  # the recorded checksum is the original matrices'
    code, out, err = run_cli(capsys, "inspect", bad)
    assert code == 1 and "stored projections do not match its projections_sha256" in err
    assert_one_line_error(err)
    # with a checksum that matches the changed matrices, they are still not the seed's
    changed = dataclasses.replace(config, projections_sha256=projection_checksum(*projections_of(tensors)))
    save_adapter_file(bad, changed, tensors)
    code, out, err = run_cli(capsys, "inspect", bad)
    assert code == 1 and "MISMATCH" in out
    assert_one_line_error(err)


def test_inspect_detects_wrong_checksum(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config, tensors = read_tensors(files["vera"])
    bad = tmp_path / "bad.safetensors"
    save_adapter_file(bad, config.__class__(**{**config.__dict__, "seed": SEED + 1}), tensors)
    code, out, _ = run_cli(capsys, "inspect", bad, "--json")
    assert code == 1 and json.loads(out)["projections"]["verified"] is False


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "])
def test_bad_files_exit_1_without_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    code, _, err = run_cli(capsys, "inspect", bad)
    assert code == 1
    assert_one_line_error(err)


def test_not_an_adapter(files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for path in (files["base"], tmp_path, tmp_path / "missing"):
        code, _, err = run_cli(capsys, "inspect", path)
        assert code == 1
        assert_one_line_error(err)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["frobnicate"], ["merge", "--base", "x"], ["convert", "a", "b", "--to", "onnx"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    capsys.readouterr()


# ---------------------------------------------------------------- merge


@pytest.mark.parametrize("kind", ["vera", "dvora", "stored"])
def test_merge_equals_core_merge(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str
) -> None:
    out = tmp_path / "merged.safetensors"
    code, _, _ = run_cli(capsys, "merge", "--base", files["base"], "--adapter", files[kind], "-o", out)
    assert code == 0
    base, merged = load_file(str(files["base"])), load_file(str(out))
    assert set(merged) == set(base)
    _, tensors = read_tensors(files[kind])
    A, B = projections()
    for name in LAYERS:
        d, b, weight = tensors[f"{name}.lambda_d"], tensors[f"{name}.lambda_b"], base[f"{name}.weight"]
        if kind == "dvora":
            expected, _ = dvora_merge(weight, A, B, tensors[f"{name}.magnitude"], d, b)
        else:
            expected = merge(weight, A, B, d, b)
        np.testing.assert_array_equal(merged[f"{name}.weight"], expected)
        np.testing.assert_array_equal(merged[f"{name}.bias"], base[f"{name}.bias"])
    np.testing.assert_array_equal(merged["head.weight"], base["head.weight"])


def test_merge_matches_prefixed_names_and_lists_unmatched(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    base = load_file(str(files["base"]))
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"model.{k}": v for k, v in base.items()}, str(prefixed))
    out = tmp_path / "merged.safetensors"
    code, _, _ = run_cli(capsys, "merge", "--base", prefixed, "--adapter", files["vera"], "-o", out)
    assert code == 0 and "model.enc.fc1.weight" in load_file(str(out))

    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in base.items() if not k.startswith("enc.fc2")}, str(partial))
    code, _, err = run_cli(capsys, "merge", "--base", partial, "--adapter", files["vera"], "-o", tmp_path / "x")
    assert code == 1 and "enc.fc2" in err and "enc.fc1" not in err.split("weights:")[0].split("base file:")[1]
    assert not (tmp_path / "x").exists()


def test_merge_refuses_shape_mismatch_and_nonfinite(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    base = load_file(str(files["base"]))
    wrong = tmp_path / "wrong.safetensors"
    save_file({**base, "enc.fc1.weight": np.zeros((12, 15), np.float32)}, str(wrong))
    out = tmp_path / "merged.safetensors"
    code, _, err = run_cli(capsys, "merge", "--base", wrong, "--adapter", files["vera"], "-o", out)
    assert code == 1 and "enc.fc1" in err
    assert_one_line_error(err)

    config, tensors = read_tensors(files["vera"])
    huge = tmp_path / "huge.safetensors"
    save_adapter_file(
        huge,
        config,
        {
            **tensors,
            "enc.fc1.lambda_b": np.full(12, 1e30, np.float32),
            "enc.fc1.lambda_d": np.full(8, 1e30, np.float32),
        },
    )
    code, _, err = run_cli(capsys, "merge", "--base", files["base"], "--adapter", huge, "-o", out)
    assert code == 1 and "NaN or infinity" in err

    tensors["enc.fc2.lambda_b"] = np.where(np.arange(10) == 0, np.nan, tensors["enc.fc2.lambda_b"])
    nan_adapter = tmp_path / "nan.safetensors"
    with pytest.raises(ValueError, match=r"enc\.fc2\.lambda_b' holds NaN"):
        save_adapter_file(nan_adapter, config, tensors)
    metadata = {"format": "vera-core", "format_version": "1", "config": config.to_json()}
    write_safetensors(nan_adapter, tensors, metadata)  # written around the checks
    code, _, err = run_cli(capsys, "merge", "--base", files["base"], "--adapter", nan_adapter, "-o", out)
    assert code == 1 and "enc.fc2.lambda_b" in err and "NaN" in err
    assert not out.exists()


def test_merge_failure_mid_write_leaves_nothing(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vera_core.safetensors_file

    real = vera_core.safetensors_file.flat_bytes
    calls = []

    def fail_halfway(array: np.ndarray) -> memoryview:
        calls.append(1)
        if len(calls) > 2:  # after the header and two tensors are written
            raise OSError(28, "No space left on device")
        return real(array)

    monkeypatch.setattr(vera_core.safetensors_file, "flat_bytes", fail_halfway)
    out = tmp_path / "out" / "merged.safetensors"
    code, _, err = run_cli(capsys, "merge", "--base", files["base"], "--adapter", files["vera"], "-o", out)
    assert code == 1 and "No space left on device" in err
    assert_one_line_error(err)
    assert list(out.parent.iterdir()) == []


def test_merge_does_not_import_torch(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    script = (
        "import sys; from vera_cli.main import main; "
        f"code = main(['merge', '--base', {str(files['base'])!r}, '--adapter', {str(files['dvora'])!r}, "
        f"'-o', {str(out)!r}]); "
        "assert code == 0; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert out.exists()


# ---------------------------------------------------------------- convert


def test_convert_round_trip(files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder, back = tmp_path / "peft", tmp_path / "back.safetensors"
    assert run_cli(capsys, "convert", files["vera"], folder)[0] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "VERA"
    code, out, _ = run_cli(capsys, "inspect", folder, "--json")
    assert code == 0 and json.loads(out)["projections"]["verified"] is True
    assert run_cli(capsys, "convert", folder, back)[0] == 0

    config, original = read_tensors(files["vera"])
    config_back, returned = read_tensors(back)
    assert config_back.prng_id == config.prng_id and config_back.projections_sha256 == config.projections_sha256
    assert "projections.A" not in returned  # recognised as vera-core's stream: stored as a seed again
    for name, (_, _, rank) in LAYERS.items():
        np.testing.assert_array_equal(returned[f"{name}.lambda_b"], original[f"{name}.lambda_b"])
        np.testing.assert_array_equal(returned[f"{name}.lambda_d"][:rank], original[f"{name}.lambda_d"])
        assert not returned[f"{name}.lambda_d"][rank:].any()

    merged = {}
    for adapter in (files["vera"], folder, back):
        out_file = tmp_path / f"merged-{len(merged)}.safetensors"
        assert run_cli(capsys, "merge", "--base", files["base"], "--adapter", adapter, "-o", out_file)[0] == 0
        merged[adapter] = load_file(str(out_file))
    first, *rest = merged.values()
    for other in rest:
        for key in first:
            np.testing.assert_allclose(other[key], first[key], rtol=1e-6, atol=1e-6)


def test_convert_refusals(files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "convert", files["dvora"], tmp_path / "peft")
    assert code == 1 and "DVORA" in err and not (tmp_path / "peft").exists()
    code, _, err = run_cli(capsys, "convert", files["vera"], tmp_path / "x.safetensors", "--to", "vera")
    assert code == 1 and "already" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "convert", files["vera"], busy)
    assert code == 1 and sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_merge_fan_in_fan_out_and_trained_bias(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(16, 12)).astype(np.float32)  # Conv1D layout: (in, out)
    base = tmp_path / "base.safetensors"
    save_file({"h.0.attn.c_attn.weight": weight, "h.0.attn.c_attn.bias": np.zeros(12, np.float32)}, str(base))
    A, B = generate_projections(SEED, R, 16, 12, xp=np)
    d, b = rng.normal(size=R).astype(np.float32), rng.normal(size=12).astype(np.float32)
    bias = rng.normal(size=12).astype(np.float32)
    config = AdapterConfig(
        r=R,
        seed=SEED,
        max_in=16,
        max_out=12,
        bias="vera_only",
        layers={"attn.c_attn": LayerSpec(12, R, 16, fan_in_fan_out=True)},
        projections_sha256=projection_checksum(A, B),
    )
    adapter = tmp_path / "conv1d.safetensors"
    save_adapter_file(adapter, config, {"attn.c_attn.lambda_d": d, "attn.c_attn.lambda_b": b, "attn.c_attn.bias": bias})
    out = tmp_path / "merged.safetensors"
    assert run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", out)[0] == 0
    merged = load_file(str(out))
    np.testing.assert_array_equal(merged["h.0.attn.c_attn.weight"], merge(weight, A, B, d, b, fan_in_fan_out=True))
    np.testing.assert_array_equal(merged["h.0.attn.c_attn.bias"], bias)


def test_merge_applies_every_trained_bias(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """bias='all' adapters also train biases of layers they do not adapt: the merge must carry them over."""
    rng = np.random.default_rng(5)
    base = {
        "fc1.weight": rng.standard_normal((5, 6)).astype(np.float32),
        "fc1.bias": rng.standard_normal(5).astype(np.float32),
        "head.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "head.bias": rng.standard_normal(3).astype(np.float32),
    }
    A, B = generate_projections(SEED, R, 6, 5, xp=np)
    config = AdapterConfig(
        r=R,
        seed=SEED,
        max_in=6,
        max_out=5,
        layers={"fc1": LayerSpec(5, R, 6)},
        bias="all",
        bias_modules={"head": 3},
        projections_sha256=projection_checksum(A, B),
    )
    trained = {
        "fc1.lambda_d": rng.standard_normal(R).astype(np.float32),
        "fc1.lambda_b": rng.standard_normal(5).astype(np.float32),
        "fc1.bias": rng.standard_normal(5).astype(np.float32),
        "head.bias": rng.standard_normal(3).astype(np.float32),
    }
    save_file(base, str(tmp_path / "base.safetensors"))
    save_adapter_file(tmp_path / "a.safetensors", config, trained)
    argv = ("merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(tmp_path / "a.safetensors"))
    code, _, _ = run_cli(capsys, *argv, "-o", str(tmp_path / "out.safetensors"))
    assert code == 0
    out = load_file(str(tmp_path / "out.safetensors"))
    np.testing.assert_array_equal(out["head.bias"], trained["head.bias"])
    np.testing.assert_array_equal(out["fc1.bias"], trained["fc1.bias"])
    np.testing.assert_array_equal(out["head.weight"], base["head.weight"])
    expected = merge(base["fc1.weight"], A, B, trained["fc1.lambda_d"], trained["fc1.lambda_b"])
    np.testing.assert_allclose(out["fc1.weight"], expected, rtol=1e-6, atol=1e-6)

    del base["head.bias"]
    save_file(base, str(tmp_path / "no_head_bias.safetensors"))
    code, _, err = run_cli(
        capsys,
        "merge",
        "--base",
        str(tmp_path / "no_head_bias.safetensors"),
        "--adapter",
        str(tmp_path / "a.safetensors"),
        "-o",
        str(tmp_path / "bad.safetensors"),
    )
    assert code == 1 and "'<layer>.bias'" in err and "head" in err
    assert not (tmp_path / "bad.safetensors").exists()
