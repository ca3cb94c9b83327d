"""Validate fully, then mutate: a failing call leaves the model bit-identical (issue 12's torch defects)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch_helpers import Int8Linear, TinyLM, randomize_vectors  # noqa: E402

import vera_torch as vt  # noqa: E402


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _same(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == snapshot.keys() and all(torch.equal(now[k], v) for k, v in snapshot.items())


def test_a_failing_load_changes_nothing(tmp_path) -> None:
    """A DVoRA file whose second layer is quantized (no dense weight) fails after the first layer is checked."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    vt.add_vera(dense, ["0", "2"], r=4, dvora=True)
    path = tmp_path / "dvora.safetensors"
    vt.save_adapter(dense, path)
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), Int8Linear(nn.Linear(8, 6)))
    before = copy.deepcopy(target)
    with pytest.raises((TypeError, ValueError), match="dense floating-point weight"):
        vt.load_adapter(target, path)
    assert type(target[0]) is nn.Linear and not hasattr(target, "vera_state")
    assert _same(target, before.state_dict())
    vt.add_vera(target, ["0"], r=4)  # "default" is still free: nothing half-attached


def test_merge_checks_every_layer_before_changing_any() -> None:
    """VeRA on layers 0 and 2, DVoRA on layer 2, both active: refused before layer 0 is merged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    vt.add_vera(model, ["0", "2"], r=4, adapter_name="v")
    vt.add_vera(model, ["2"], r=4, adapter_name="d", dvora=True)
    randomize_vectors(model)
    vt.set_adapter(model, ["v", "d"])
    before = _snapshot(model)
    for merge in (lambda: vt.merge_adapter(model, safe=True), lambda: vt.merge_and_unload(model)):
        with pytest.raises(RuntimeError, match="merged alone"):
            merge()
        assert _same(model, before) and not any(layer.merged_adapters for layer in vt.vera_layers(model).values())


def test_dvora_merge_refuses_what_cannot_be_undone_and_unmerge_never_writes_inf() -> None:
    torch.manual_seed(0)
    model = vt.add_vera(nn.Sequential(nn.Linear(8, 6)), ["0"], r=4, dvora=True)
    randomize_vectors(model)
    with torch.no_grad():
        model[0].vectors("default")["magnitude"][2] = 1e-40
    before = _snapshot(model)
    with pytest.raises(ValueError, match="cannot be undone"):
        vt.merge_adapter(model, safe=True)
    assert _same(model, before)
    vt.merge_adapter(model)  # forced
    merged = _snapshot(model)
    with pytest.raises(ValueError, match="NaN or infinity"):
        vt.unmerge_adapter(model)
    assert _same(model, merged) and model[0].merged_adapters == ["default"]


def test_disable_adapters_freezes_the_vectors_inside_and_restores_them() -> None:
    model = vt.add_vera(TinyLM(), "all-linear", r=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with vt.disable_adapters(model):
        assert not any(p.requires_grad for p in model.parameters())
        assert vt.trainable_parameters(model).trainable == 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_adapter_arguments_are_checked_before_anything_changes() -> None:
    model = TinyLM()
    before = _snapshot(model)
    for bad in ({"d_initial": float("nan")}, {"dropout": 1.0}, {"r": 4.0}, {"seed": -1}, {"dvora": "yes"}):
        with pytest.raises(ValueError):
            vt.add_vera(model, "all-linear", **({"r": 4} | bad))
    assert _same(model, before) and not hasattr(model, "vera_state")
