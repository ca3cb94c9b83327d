"""Adapter files: round trips, checksums, errors, and the cross-backend check with PyTorch."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vera_core as vc
from vera_core.adapter_file import (
    PROJECTION_KEYS,
    AdapterConfig,
    AdapterFileError,
    LayerSpec,
    projection_checksum,
    save_adapter_file,
)
from vera_core.errors import NotAnAdapterError, ProjectionMismatchError, UnknownGeneratorError
from vera_numpy import AdaptedModel, ReLU, Sequential, add_vera

from .array_backend_helpers import from_numpy, read_tensors, to_numpy, train_a_little, weight_dict

TARGETS = ["enc.0.fc", "enc.1.fc"]


def outputs(xp: Any, model: AdaptedModel, seed: int = 5) -> dict[str, np.ndarray]:
    """Each adapted layer's output on fixed random inputs, on the host."""
    rng = np.random.default_rng(seed)
    result = {}
    for name in model.targets:
        layer = model.layer(name)
        x = from_numpy(xp, rng.standard_normal((3, layer.in_features)).astype(np.float32))
        result[name] = to_numpy(layer.forward(xp.astype(x, layer.weight.dtype)))
    return result


def float32_weights(xp: Any) -> dict[str, Any]:
    return {name: xp.astype(value, xp.float32) for name, value in weight_dict(xp).items()}


@pytest.mark.parametrize("dvora", [False, True])
def test_round_trip(xp: Any, tmp_path: Path, dvora: bool) -> None:
    weights = weight_dict(xp)
    model = add_vera(weights, TARGETS, r=4, seed=9, dvora=dvora, bias="vera_only")
    train_a_little(xp, model)
    model.save(tmp_path / "adapter.safetensors")
    loaded = AdaptedModel.load(tmp_path / "adapter.safetensors", weights)
    assert loaded.config == dataclasses.replace(model.config, projections_sha256=loaded.config.projections_sha256)
    for name, value in model.parameters().items():
        np.testing.assert_array_equal(to_numpy(loaded.parameters()[name]), to_numpy(value), err_msg=name)
    for name, value in outputs(xp, model).items():
        np.testing.assert_array_equal(outputs(xp, loaded)[name], value)


def test_file_contents(tmp_path: Path) -> None:
    import array_api_compat.numpy as xp

    model = add_vera(weight_dict(xp), TARGETS, r=4, seed=9, dvora=True, detach_norm=True)
    model.save(tmp_path / "a.safetensors")
    config, tensors = read_tensors(tmp_path / "a.safetensors")
    assert config.method == "dvora"
    assert config.extra == {"framework": "numpy", "detach_norm": True}
    assert AdaptedModel.load(tmp_path / "a.safetensors", weight_dict(xp)).layer("enc.0.fc").detach_norm
    assert config.layers["enc.1.fc"] == LayerSpec(out_features=6, rank=4, in_features=7)
    assert config.projections_sha256 == projection_checksum(*vc.generate_projections(9, 4, 7, 7, xp=np))
    assert sorted(tensors) == sorted(f"{n}.{p}" for n in TARGETS for p in ("lambda_b", "lambda_d", "magnitude"))
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float64)}


@pytest.mark.requires("array_api_strict")
def test_file_moves_between_namespaces(tmp_path: Path) -> None:
    import array_api_compat.numpy as np_xp
    import array_api_strict as strict_xp

    strict_model = add_vera(float32_weights(strict_xp), TARGETS, r=4, seed=1)
    train_a_little(strict_xp, strict_model)
    strict_model.save(tmp_path / "a.safetensors", save_projections=True)
    assert PROJECTION_KEYS[0] in read_tensors(tmp_path / "a.safetensors")[1]
    numpy_model = AdaptedModel.load(tmp_path / "a.safetensors", float32_weights(np_xp))
    for name, value in outputs(strict_xp, strict_model).items():
        np.testing.assert_array_equal(outputs(np_xp, numpy_model)[name], value)


def rewrite(path: Path, target: Path, **changes: Any) -> None:
    """Copy an adapter file with its config changed (bypassing the writer's checksum)."""
    config, tensors = read_tensors(path)
    save_adapter_file(target, dataclasses.replace(config, **changes), tensors)


def test_load_errors(xp: Any, tmp_path: Path) -> None:
    weights = weight_dict(xp)
    add_vera(weights, TARGETS, r=4, seed=2).save(tmp_path / "a.safetensors")
    rewrite(tmp_path / "a.safetensors", tmp_path / "bad_sum.safetensors", projections_sha256="0" * 64)
    with pytest.raises(ProjectionMismatchError, match="do not match its projections_sha256"):
        AdaptedModel.load(tmp_path / "bad_sum.safetensors", weights)
    rewrite(tmp_path / "a.safetensors", tmp_path / "peft.safetensors", prng_id="torch-mt19937-peft")
    if importlib.util.find_spec("torch") is None:  # PEFT's generator needs torch to rerun
        with pytest.raises(UnknownGeneratorError, match="install torch to regenerate them"):
            AdaptedModel.load(tmp_path / "peft.safetensors", weights)
    else:
        with pytest.raises(ProjectionMismatchError, match="torch-mt19937-peft v1 do not match"):
            AdaptedModel.load(tmp_path / "peft.safetensors", weights)
    rewrite(tmp_path / "a.safetensors", tmp_path / "foreign.safetensors", prng_id="my-rng")
    with pytest.raises(UnknownGeneratorError, match="'my-rng' version 1, which this vera-core cannot regenerate"):
        AdaptedModel.load(tmp_path / "foreign.safetensors", weights)
    with pytest.raises(AdapterFileError, match=r"targets layer 'enc.1.fc', which the weights lack"):
        AdaptedModel.load(tmp_path / "a.safetensors", {k: v for k, v in weights.items() if "enc.1" not in k})
    resized = dict(weights, **{"enc.0.fc.weight": from_numpy(xp, np.ones((6, 5)))})
    with pytest.raises(AdapterFileError, match=r"expects \(out, in\) = \(7, 5\) but the weight gives \(6, 5\)"):
        AdaptedModel.load(tmp_path / "a.safetensors", resized)
    save_adapter_file_plain(tmp_path / "plain.safetensors")
    with pytest.raises(NotAnAdapterError, match="not a vera-core adapter"):
        AdaptedModel.load(tmp_path / "plain.safetensors", weights)


def save_adapter_file_plain(path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(path))


def torch_outputs(path: Path, host_weights: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Each adapted layer's output computed by vera_core on torch tensors from the file alone."""
    import array_api_compat.torch as txp
    import torch

    config, host = read_tensors(path)
    tensors = {name: torch.from_numpy(np.array(value)) for name, value in host.items()}
    A, B = vc.generate_projections(config.seed, config.r, config.max_in, config.max_out, xp=txp)
    assert projection_checksum(A.numpy(), B.numpy()) == config.projections_sha256
    result = {}
    for name in config.layers:
        W, bias = (torch.from_numpy(host_weights[f"{name}.{k}"]) for k in ("weight", "bias"))
        bias = tensors.get(f"{name}.bias", bias)
        x = torch.from_numpy(inputs[name])
        d, b = tensors[f"{name}.lambda_d"], tensors[f"{name}.lambda_b"]
        if config.method == "dvora":
            frozen = vc.dvora_precompute(W, A, config.layers[name].rank)
            y, _ = vc.dvora_forward(x, vc.linear(x, W), frozen, A, B, tensors[f"{name}.magnitude"], d, b, bias=bias)
        else:
            y, _ = vc.vera_forward(x, A, B, d, b, base=vc.linear(x, W, bias))
        result[name] = y.numpy()
    return result


@pytest.mark.requires("torch")
@pytest.mark.parametrize("dvora", [False, True])
def test_numpy_adapter_gives_the_same_outputs_in_torch(tmp_path: Path, dvora: bool) -> None:
    import array_api_compat.numpy as xp

    weights = float32_weights(xp)
    model = add_vera(weights, TARGETS, r=4, seed=21, dvora=dvora, bias="all")
    train_a_little(xp, model)
    model.save(tmp_path / "a.safetensors")
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal((3, model.layer(name).in_features)).astype(np.float32) for name in TARGETS}
    expected = {name: model.layer(name).forward(inputs[name]) for name in TARGETS}
    got = torch_outputs(tmp_path / "a.safetensors", weights, inputs)
    for name in TARGETS:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.requires("torch")
@pytest.mark.parametrize("dvora", [False, True])
def test_torch_adapter_gives_the_same_outputs_in_numpy(tmp_path: Path, dvora: bool) -> None:
    import array_api_compat.numpy as xp
    import torch

    weights = {name: np.asarray(value) for name, value in float32_weights(xp).items()}
    specs = {"enc.0.fc": LayerSpec(7, 3, 5), "enc.1.fc": LayerSpec(6, 4, 7)}
    config = AdapterConfig(r=4, seed=33, max_in=7, max_out=7, layers=specs, method="dvora" if dvora else "vera")
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, spec in specs.items():
        tensors[f"{name}.lambda_d"] = torch.rand(spec.rank, generator=generator) + 0.5
        tensors[f"{name}.lambda_b"] = torch.rand(spec.out_features, generator=generator) + 0.5
        if dvora:
            tensors[f"{name}.magnitude"] = torch.rand(spec.out_features, generator=generator) + 0.5
    A, B = vc.generate_projections(33, 4, 7, 7, xp=np)
    config = dataclasses.replace(config, projections_sha256=projection_checksum(A, B))
    save_adapter_file(tmp_path / "t.safetensors", config, {name: value.numpy() for name, value in tensors.items()})
    rng = np.random.default_rng(1)
    inputs = {name: rng.standard_normal((3, spec.in_features)).astype(np.float32) for name, spec in specs.items()}
    expected = torch_outputs(tmp_path / "t.safetensors", weights, inputs)
    model = AdaptedModel.load(tmp_path / "t.safetensors", weights)
    assert [model.layer(name).rank for name in specs] == [3, 4]
    for name in specs:
        np.testing.assert_allclose(model.layer(name).forward(inputs[name]), expected[name], rtol=1e-5, atol=1e-5)


def torch_mlp() -> Any:
    """A torch MLP whose state_dict is a weight dictionary with layers fc1 and fc2."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict(fc1=torch.nn.Linear(5, 7), act=torch.nn.ReLU(), fc2=torch.nn.Linear(7, 6)))


@pytest.mark.requires("torch")
@pytest.mark.parametrize("dvora", [False, True])
def test_adapters_move_both_ways_through_vera_torch(tmp_path: Path, dvora: bool) -> None:
    import array_api_compat.numpy as xp
    import torch

    import vera_torch as vt

    torch_net = torch_mlp()
    weights = {name: value.detach().numpy().copy() for name, value in torch_net.state_dict().items()}
    x = np.random.default_rng(4).standard_normal((3, 5)).astype(np.float32)

    model = add_vera(weights, "all-linear", r=4, seed=3, dvora=dvora, detach_norm=dvora)
    train_a_little(xp, model)
    model.save(tmp_path / "numpy.safetensors")
    numpy_net = Sequential({"fc1": model.layer("fc1"), "act": ReLU(), "fc2": model.layer("fc2")})
    vt.load_adapter(torch_net, tmp_path / "numpy.safetensors")
    with torch.no_grad():
        np.testing.assert_allclose(torch_net(torch.from_numpy(x)).numpy(), numpy_net.forward(x), rtol=1e-5, atol=1e-5)

    other = vt.add_vera(torch_mlp(), ["fc1", "fc2"], r=4, seed=5, dvora=dvora)
    with torch.no_grad():
        for parameter in other.parameters():
            if parameter.requires_grad:
                parameter.uniform_(0.5, 1.5)
    vt.save_adapter(other, tmp_path / "torch.safetensors")
    loaded = AdaptedModel.load(tmp_path / "torch.safetensors", weights)
    loaded_net = Sequential({"fc1": loaded.layer("fc1"), "act": ReLU(), "fc2": loaded.layer("fc2")})
    with torch.no_grad():
        np.testing.assert_allclose(loaded_net.forward(x), other(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.requires("torch")
def test_torch_bias_all_adapter_runs_in_numpy(tmp_path: Path) -> None:
    """A torch adapter trained with bias='all' carries the biases of layers it does not adapt."""
    import torch

    import vera_torch as vt

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    weights = {
        f"{name}.{kind}": np.array(getattr(net[int(name)], kind).detach().numpy())
        for name in ("0", "2")
        for kind in ("weight", "bias")
    }
    vt.add_vera(net, ["0"], r=4, bias="all")
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "lambda" in name or name.endswith("bias"):
                param.add_(torch.randn(param.shape) * 0.3)
    vt.save_adapter(net, tmp_path / "a.safetensors")
    model = AdaptedModel.load(tmp_path / "a.safetensors", weights)
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    hidden = np.maximum(model.layer("0").forward(x), 0)
    np.testing.assert_allclose(model.layer("2").forward(hidden), net(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    assert not np.array_equal(model.weights["2.bias"], weights["2.bias"])

    del weights["2.bias"]
    with pytest.raises(AdapterFileError, match=r"trained '2\.bias'"):
        AdaptedModel.load(tmp_path / "a.safetensors", weights)
