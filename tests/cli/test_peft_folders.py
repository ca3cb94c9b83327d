"""The command line on folders written by PEFT itself, and PEFT loading our exports."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vera_cli.main import main

from .cli_helpers import LAYERS, read_tensors

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


class Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 12)
        self.fc2 = torch.nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = Encoder()
        self.head = torch.nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))


def peft_model(save_projection: bool) -> torch.nn.Module:
    """A PEFT VeRA model over enc.fc1 and enc.fc2 with random (trained-looking) vectors."""
    torch.manual_seed(0)
    with warnings.catch_warnings():  # PEFT warns about save_projection=False
        warnings.simplefilter("ignore", UserWarning)
        config = peft.VeraConfig(
            r=8, target_modules=["fc1", "fc2"], projection_prng_key=7, save_projection=save_projection
        )
        model = peft.get_peft_model(Model(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda" in name:
                param.copy_(torch.randn_like(param))
    return model


def base_file(model: torch.nn.Module, path: Path) -> Path:
    """The base model's weights as a safetensors file, names prefixed with 'model.'."""
    state = model.get_base_model().state_dict()
    plain = {}
    for key, value in state.items():
        if "vera_" in key:
            continue
        plain["model." + key.replace(".base_layer", "")] = value.detach().numpy().copy()
    save_file(plain, str(path))
    return path


@pytest.mark.parametrize("save_projection", [True, False])
def test_merge_peft_folder_equals_peft_merge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], save_projection: bool
) -> None:
    model = peft_model(save_projection)
    folder = tmp_path / "peft"
    model.save_pretrained(folder)
    base = base_file(model, tmp_path / "base.safetensors")
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--base", str(base), "--adapter", str(folder), "-o", str(out)]) == 0
    capsys.readouterr()
    expected = model.merge_and_unload().state_dict()
    merged = load_file(str(out))
    for key, value in expected.items():
        np.testing.assert_allclose(merged["model." + key], value.numpy(), rtol=1e-5, atol=1e-6)

    assert main(["inspect", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "peft" and report["seed"] == 7 and report["r"] == 8
    assert report["projections"]["verified"] is (True if save_projection else None)


def test_convert_peft_without_projections_needs_max_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = peft_model(save_projection=False)
    folder = tmp_path / "peft"
    model.save_pretrained(folder)
    out = tmp_path / "ours.safetensors"
    assert main(["convert", str(folder), str(out)]) == 1
    assert "max_in" in capsys.readouterr().err and not out.exists()
    assert main(["convert", str(folder), str(out), "--max-in", "16"]) == 0
    config, tensors = read_tensors(out)
    assert config.prng_id == "torch-mt19937-peft" and tensors["projections.A"].shape == (8, 16)
    np.testing.assert_array_equal(tensors["projections.A"], model.base_model.vera_A["default"].numpy())
    assert main(["inspect", str(out)]) == 0


def test_peft_loads_our_export(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "peft"
    assert main(["convert", str(files["vera"]), str(folder)]) == 0
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", "--base", str(files["base"]), "--adapter", str(files["vera"]), "-o", str(merged)]) == 0

    base = load_file(str(files["base"]))
    model = Model()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()} | {"head.bias": torch.zeros(3)})
    loaded = peft.PeftModel.from_pretrained(model, folder)
    x = torch.randn(5, 16)
    with torch.no_grad():
        adapted = loaded(x)
    plain = Model()
    plain.load_state_dict(
        {k: torch.from_numpy(v) for k, v in load_file(str(merged)).items()} | {"head.bias": torch.zeros(3)}
    )
    with torch.no_grad():
        np.testing.assert_allclose(adapted.numpy(), plain(x).numpy(), rtol=1e-5, atol=1e-5)
    assert set(LAYERS) == {"enc.fc1", "enc.fc2"}


def test_without_torch_is_said_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import vera_cli.inspect
    import vera_core.generators
    import vera_core.loading

    stored, bare = tmp_path / "stored", tmp_path / "bare"
    peft_model(save_projection=True).save_pretrained(stored)
    model = peft_model(save_projection=False)
    model.save_pretrained(bare)
    base = base_file(model, tmp_path / "base.safetensors")
    monkeypatch.setattr(vera_core.generators, "torch_available", lambda: False)
    vera_core.loading.DEFAULT_CACHE.clear()  # PEFT's matrices drawn by earlier tests must not be reused
    monkeypatch.setattr(vera_cli.inspect, "torch_available", lambda: False)

    assert main(["inspect", str(stored), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["projections"]["detail"] == "stored; cannot verify: torch not installed"
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--base", str(base), "--adapter", str(stored), "-o", str(out)]) == 0
    assert main(["merge", "--base", str(base), "--adapter", str(bare), "-o", str(tmp_path / "no.safetensors")]) == 1
    assert "install torch" in capsys.readouterr().err
    assert not (tmp_path / "no.safetensors").exists()
