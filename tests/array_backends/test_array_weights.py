"""Adapters on weight dictionaries: targets, adapted forward, merge and unmerge, errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import vera_core as vc
from vera_numpy import DVoraLinear, Linear, VeraLinear, add_vera

from .array_backend_helpers import from_numpy, to_numpy, train_a_little, weight_dict


@pytest.mark.parametrize("dvora", [False, True])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_matches_adapted_forward_and_unmerge_restores(xp: Any, dvora: bool, fan_in_fan_out: bool) -> None:
    weights = weight_dict(xp, fan_in_fan_out=fan_in_fan_out)
    originals = {name: to_numpy(value).copy() for name, value in weights.items()}
    model = add_vera(weights, ["fc"], r=4, seed=3, dvora=dvora, bias="vera_only", fan_in_fan_out=fan_in_fan_out)
    assert model.targets == ["enc.0.fc", "enc.1.fc"]
    train_a_little(xp, model)
    merged = model.merge()
    x = from_numpy(xp, np.random.default_rng(2).standard_normal((4, 5)))
    for name, width in (("enc.0.fc", 5), ("enc.1.fc", 7)):
        layer = model.layer(name)
        inputs = x if width == 5 else from_numpy(xp, np.ones((4, 7)))
        expected = vc.linear(inputs, merged[f"{name}.weight"], merged[f"{name}.bias"], fan_in_fan_out=fan_in_fan_out)
        np.testing.assert_allclose(to_numpy(layer.forward(inputs)), to_numpy(expected), rtol=1e-10, atol=1e-10)
    assert merged["head.weight"] is weights["head.weight"]
    restored = model.unmerge(merged)
    for name, value in originals.items():
        np.testing.assert_allclose(to_numpy(restored[name]), value, rtol=1e-10, atol=1e-10, err_msg=name)
        np.testing.assert_array_equal(to_numpy(weights[name]), value, err_msg=f"{name} was modified")


def test_layer_gives_adapted_and_frozen_layers(xp: Any) -> None:
    weights = weight_dict(xp)
    model = add_vera(weights, r"enc\.\d\.fc", r=4, dvora=True)
    assert isinstance(model.layer("enc.0.fc"), DVoraLinear)
    head = model.layer("head")
    assert isinstance(head, Linear)
    assert head.parameters() == {}
    assert head is model.layer("head")
    assert isinstance(add_vera(weights, "all-linear", r=2).layer("head"), VeraLinear)
    assert sorted(model.parameters()) == [
        f"enc.{i}.fc.{p}" for i in (0, 1) for p in ("lambda_b", "lambda_d", "magnitude")
    ]


def test_all_linear_leaves_out_lm_head(xp: Any) -> None:
    weights = {"body.weight": from_numpy(xp, np.ones((3, 2))), "lm_head.weight": from_numpy(xp, np.ones((4, 3)))}
    assert add_vera(weights, "all-linear", r=2).targets == ["body"]
    assert add_vera(weights, ["lm_head"], r=2).targets == ["lm_head"]


def test_layers_to_transform(xp: Any) -> None:
    model = add_vera(weight_dict(xp), ["fc"], r=2, layers_to_transform=[1], layers_pattern="enc")
    assert model.targets == ["enc.1.fc"]
    assert model.config.max_in == 7
    assert model.config.layers["enc.1.fc"].in_features == 7


def test_shared_projections_have_the_largest_shape(xp: Any) -> None:
    model = add_vera(weight_dict(xp), "all-linear", r=4, seed=11)
    assert (model.config.max_in, model.config.max_out) == (7, 7)
    A, B = vc.generate_projections(11, 4, 7, 7, xp=np)
    np.testing.assert_array_equal(to_numpy(model.A), A)
    np.testing.assert_array_equal(to_numpy(model.B), B)


def test_weight_dict_errors(xp: Any) -> None:
    weights = weight_dict(xp)
    with pytest.raises(ValueError, match=r"matches none of the 3 candidate layers: enc\.0\.fc, enc\.1\.fc, head"):
        add_vera(weights, ["attn"])
    with pytest.raises(ValueError, match="empty"):
        add_vera({}, ["fc"])
    model = add_vera(weights, ["fc"], r=2, dvora=True)
    with pytest.raises(KeyError, match=r"no dense layer .norm. in the weights; adapted: enc\.0\.fc, enc\.1\.fc"):
        model.layer("norm")
    with pytest.raises(ValueError, match="call merge"):
        model.unmerge(weights)
    other = dict(weights, **{"enc.0.fc.weight": from_numpy(xp, np.ones((7, 4)))})
    with pytest.raises(ValueError, match=r"'enc.0.fc.weight' has shape \(7, 4\), the adapted model \(7, 5\)"):
        model.merge(other)
    with pytest.raises(KeyError, match=r"the weights have no .enc\.1\.fc\.weight."):
        model.merge({"enc.0.fc.weight": weights["enc.0.fc.weight"]})
    with pytest.raises(ValueError, match="no bias"):
        add_vera({"fc.weight": weights["head.weight"]}, ["fc"], r=2, bias="all")
