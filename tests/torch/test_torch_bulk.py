"""Loading a folder of adapters into the bank at once, and saving every adapter as a file."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from torch_helpers import TinyLM, randomize_vectors  # noqa: E402

import vera_torch as vt  # noqa: E402
from vera_core import AdapterFileError, read_adapter  # noqa: E402


def _ids(batch: int) -> torch.Tensor:
    return torch.randint(0, 11, (batch, 5), generator=torch.Generator().manual_seed(0))


def _donor() -> tuple[torch.nn.Module, list[str]]:
    """Twelve adapters of three layouts: VeRA r=4, DVoRA r=4, VeRA r=2 on fewer layers."""
    torch.manual_seed(0)
    model = TinyLM()
    names = []
    for i in range(12):
        name = f"user{i:02d}"
        if i % 3 == 0:
            vt.add_vera(model, "all-linear", r=4, adapter_name=name)
        elif i % 3 == 1:
            vt.add_vera(model, "all-linear", r=4, adapter_name=name, dvora=True)
        else:
            vt.add_vera(model, ["up", "down"], r=2, adapter_name=name)
        names.append(name)
    randomize_vectors(model)
    return model, names


def _base() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def test_a_folder_loads_into_the_bank_and_serves_like_the_original(tmp_path) -> None:
    donor, names = _donor()
    written = vt.save_adapters(donor, tmp_path)
    assert [p.name for p in written] == [f"{n}.safetensors" for n in names]
    model = _base()
    assert vt.load_adapters(model, tmp_path) == names
    assert model.vera_state.slots.capacity == len(names)  # reserved once, exactly
    rows = [*names, "__base__"]
    ids = _ids(len(rows))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, adapter_names=rows), donor(ids, adapter_names=rows), rtol=0, atol=0)
    again = tmp_path / "again"
    vt.save_adapters(model, again)
    for name in names:  # what loaded is what was saved, bit for bit: config text and every tensor's bytes
        first, second = read_adapter(tmp_path / f"{name}.safetensors"), read_adapter(again / f"{name}.safetensors")
        assert first.payload_sha256 == second.payload_sha256 and first.payload_sha256


def test_one_bad_file_stops_the_load_before_anything_changes(tmp_path) -> None:
    donor, names = _donor()
    vt.save_adapters(donor, tmp_path)
    broken = tmp_path / f"{names[7]}.safetensors"
    data = bytearray(broken.read_bytes())
    data[-3] ^= 0x01  # one bit of a vector
    broken.write_bytes(bytes(data))
    model = vt.add_vera(_base(), ["up"], r=2, adapter_name="existing")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterFileError, match=names[7]):
        vt.load_adapters(model, tmp_path)
    assert vt.list_adapters(model) == ["existing"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="already has an adapter named 'existing'"):
        vt.load_adapters(model, [tmp_path / f"{names[0]}.safetensors"], names=["existing"])
    with pytest.raises(ValueError, match="given twice"):
        vt.load_adapters(model, [tmp_path / f"{n}.safetensors" for n in names[:2]], names=["a", "a"])
