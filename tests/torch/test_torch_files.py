"""Saving and loading adapters in the vera-core file format."""

import copy
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from torch_helpers import Conv1D, TinyLM, randomize_vectors, read_tensors  # noqa: E402

import vera_torch as vt  # noqa: E402
from vera_core.adapter_file import AdapterFileError, save_adapter_file  # noqa: E402
from vera_core.loading import read_adapter  # noqa: E402


def _ids():
    return torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))


def _lm(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TinyLM(**kwargs)


@pytest.mark.parametrize("dvora", [False, True])
@pytest.mark.parametrize("save_projections", [False, True])
def test_round_trip(tmp_path, dvora, save_projections):
    model = vt.add_vera(_lm(), "all-linear", r=6, seed=42, dvora=dvora)
    randomize_vectors(model)
    path = tmp_path / "adapter.safetensors"
    config = vt.save_adapter(model, path, save_projections=save_projections)
    assert config.method == ("dvora" if dvora else "vera")
    assert all(spec.in_features is not None for spec in config.layers.values())
    stored = load_file(str(path))
    assert ("projections.A" in stored) == save_projections
    fresh = _lm()
    loaded = vt.load_adapter(fresh, path)
    assert loaded == config
    # DVoRA's Gram matrix from a file-backed A can round differently (BLAS alignment paths)
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dvora else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(fresh(_ids()), model(_ids()), **tolerance)


def test_metadata_records_what_regeneration_needs(tmp_path):
    model = vt.add_vera(_lm(), ["up", "down"], r=4, seed=9)
    path = tmp_path / "a.safetensors"
    vt.save_adapter(model, path)
    meta = json.loads(read_adapter(path).config.to_json())
    assert (meta["seed"], meta["r"], meta["max_in"], meta["max_out"]) == (9, 4, 32, 32)
    assert meta["prng_id"] == "threefry2x32-20" and meta["prng_version"] == 1
    assert len(meta["projections_sha256"]) == 64
    assert sorted(meta["layers"]) == ["layers.0.down", "layers.0.up", "layers.1.down", "layers.1.up"]


def test_smaller_rank_adapter_round_trips(tmp_path):
    model = _lm()
    vt.add_vera(model, "all-linear", r=8, adapter_name="big")
    vt.add_vera(model, "all-linear", r=3, adapter_name="small")
    vt.set_adapter(model, "small")
    randomize_vectors(model)
    path = tmp_path / "small.safetensors"
    config = vt.save_adapter(model, path, "small")
    assert config.r == 8 and {s.rank for s in config.layers.values()} == {3}
    fresh = _lm()
    vt.load_adapter(fresh, path, "small")
    torch.testing.assert_close(fresh(_ids()), model(_ids()), rtol=0, atol=0)


def test_wrong_shape_fails_clearly_and_leaves_model_untouched(tmp_path):
    model = vt.add_vera(_lm(d=16), "all-linear", r=4)
    path = tmp_path / "a.safetensors"
    vt.save_adapter(model, path)
    other = _lm(d=8)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(AdapterFileError, match=r"layers.0.up: the adapter expects \(out=32, in=16\).*\(out=16, in=8\)"):
        vt.load_adapter(other, path)
    assert not hasattr(other, "vera_state") and not vt.vera_layers(other)
    assert before.keys() == other.state_dict().keys()
    conv = nn.Sequential(Conv1D(4, 4))
    with pytest.raises(AdapterFileError, match="not a linear-like layer"):
        vt.load_adapter(conv, path)


def test_checksum_mismatch_is_detected(tmp_path):
    model = vt.add_vera(_lm(), "all-linear", r=4)
    path = tmp_path / "a.safetensors"
    config = vt.save_adapter(model, path)
    _, tensors = read_tensors(path)
    import dataclasses

    bad = tmp_path / "bad.safetensors"
    save_adapter_file(bad, dataclasses.replace(config, projections_sha256="0" * 64), tensors)
    fresh = _lm()
    with pytest.raises(AdapterFileError, match="do not match its projections_sha256"):
        vt.load_adapter(fresh, bad)
    assert not vt.vera_layers(fresh)


def test_loading_next_to_an_existing_adapter(tmp_path):
    model = vt.add_vera(_lm(), "all-linear", r=4)
    randomize_vectors(model)
    path = tmp_path / "a.safetensors"
    vt.save_adapter(model, path)
    y = model(_ids())
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        vt.load_adapter(model, path)
    vt.load_adapter(model, path, "copy")  # any identifier: adapters are bank rows, not attributes
    vt.load_adapter(model, path, "second", activate=True)
    assert len(model.vera_state.projections) == 1  # same seed and shapes: the pair is shared
    torch.testing.assert_close(model(_ids()), y, rtol=0, atol=0)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    model = vt.add_vera(_lm(), "all-linear", r=4)
    path = tmp_path / "a.safetensors"
    vt.save_adapter(model, path)
    before = path.read_bytes()
    import vera_core.safetensors_file

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(vera_core.safetensors_file, "flat_bytes", boom)
    randomize_vectors(model)
    with pytest.raises(OSError, match="disk full"):
        vt.save_adapter(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_bias_all_saves_every_trained_bias(tmp_path):
    """bias='all' trains every bias of the model: the file must keep the non-adapted ones too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    vt.add_vera(model, ["0"], r=2, bias="all")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.add_(1.0)
    path = tmp_path / "a.safetensors"
    config = vt.save_adapter(model, path)
    assert dict(config.bias_modules) == {"2": 3}
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    vt.load_adapter(fresh, path, activate=True)
    x = torch.randn(4, 6)
    torch.testing.assert_close(fresh(x), model(x))

    wrong = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3, bias=False))
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(AdapterFileError, match="bias of '2'"):
        vt.load_adapter(wrong, path)
    assert all(torch.equal(before[k], v) for k, v in wrong.state_dict().items())
