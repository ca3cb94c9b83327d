"""The adapter bank of vera_numpy: mixed batches and batched training equal each adapter alone.

The single-adapter reference is vera_numpy's own :class:`AdaptedModel` (its layers call
the single-adapter core functions, a different code path), trained with
:class:`vera_numpy.AdamW`; where torch is installed, vera_torch's bank and ``BankAdamW``
train the same adapters on the same batches, and files go both ways bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vera_numpy as vn
from vera_core import read_adapter

from .array_backend_helpers import from_numpy, to_numpy, weight_dict

LAYERS = ("enc.0.fc", "enc.1.fc", "head")
ADAPTERS = {
    "a": {"r": 4},
    "b": {"r": 3, "dvora": True, "detach_norm": True, "target_modules": ["enc.1.fc", "head"]},
    "c": {"r": 2, "bias": "vera_only"},
    "d": {"r": 4, "dvora": True, "bias": "vera_only"},
    "e": {"r": 3, "seed": 5},  # another pair: a second bank in every layer
}
ROWS = ["a", "b", "c", "__base__", "d", "a", "e", "b"]


def network(model: Any) -> vn.Sequential:
    return vn.Sequential(
        {
            "l0": model.layer(LAYERS[0]),
            "r0": vn.ReLU(),
            "l1": model.layer(LAYERS[1]),
            "r1": vn.ReLU(),
            "l2": model.layer(LAYERS[2]),
        }
    )


def build_bank(xp: Any, seed: int = 0) -> vn.BankModel:
    """The bank of ADAPTERS with random vectors (the same every call)."""
    model = vn.BankModel(weight_dict(xp))
    for name, options in ADAPTERS.items():
        options = dict(options)
        model.add_vera(name, options.pop("target_modules", list(LAYERS)), **options)
    rng = np.random.default_rng(seed)
    for name in ADAPTERS:
        values = {}
        for key, vector in model.vectors(name).items():
            low, high = (0.8, 1.2) if key.endswith(("magnitude", "bias")) else (-1.0, 1.0)
            scale = to_numpy(vector) if key.endswith("magnitude") else 1.0
            values[key] = from_numpy(xp, scale * rng.uniform(low, high, tuple(vector.shape)))
        model.load_vectors(name, values)
    return model


def test_mixed_rows_equal_each_adapter_alone(xp: Any) -> None:
    """Outputs, vector gradients and dL/dx of every row equal its adapter's AdaptedModel on that row alone."""
    model = build_bank(xp)
    rng = np.random.default_rng(1)
    x_host, g_host = rng.standard_normal((len(ROWS), 5)), rng.standard_normal((len(ROWS), 3))
    x, g = from_numpy(xp, x_host), from_numpy(xp, g_host)
    net = network(model)
    model.use(ROWS)
    y = to_numpy(net.forward(x))
    dx = to_numpy(net.backward(g))
    grads = {name: grad.coalesced() for name, grad in model.grads().items()}
    for name in [*ADAPTERS, "__base__"]:
        picked = [i for i, row in enumerate(ROWS) if row == name]
        if name == "__base__":
            single: Any = vn.BankModel(weight_dict(xp))  # no adapters: every layer frozen
        else:
            single = model.adapter(name)
        single_net = network(single)
        want_y = to_numpy(single_net.forward(from_numpy(xp, x_host[picked])))
        want_dx = to_numpy(single_net.backward(from_numpy(xp, g_host[picked])))
        np.testing.assert_allclose(y[picked], want_y, rtol=1e-10, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(dx[picked], want_dx, rtol=1e-10, atol=1e-10, err_msg=name)
        if name == "__base__":
            continue
        slot = model.state.slots.slot(name)
        key = model._adapter(name).key.name
        for file_name, want in single.grads().items():
            layer, kind = file_name.rsplit(".", 1)
            grad = grads[f"{layer}.{key}.{kind}"]
            position = to_numpy(grad.rows).tolist().index(slot)
            got = to_numpy(grad.values)[position][: want.shape[0]]
            np.testing.assert_allclose(got, to_numpy(want), rtol=1e-10, atol=1e-10, err_msg=f"{name} {file_name}")
    for name, grad in grads.items():  # a gradient holds the adapters the batch used, nothing else
        used = {model.state.slots.slot(n) for n in ROWS if n != "__base__"}
        assert set(to_numpy(grad.rows).tolist()) <= used, name


def _sum_loss_grad(logits: Any, labels: Any) -> Any:
    """``dL/dlogits`` of the summed (not averaged) cross-entropy: each row's loss is its own."""
    _, grad = vn.softmax_cross_entropy(logits, labels)
    return grad * logits.shape[0]


SCHEDULE = [
    ["a", "b", "c", "__base__", "d", "a", "e", "b"],
    ["a", "a", "c", "d", "d", "e", "__base__", "c"],  # b absent: its rows neither decay nor move
    ["b", "a", "c", "e", "d", "a", "e", "b"],
]


def test_batched_training_equals_training_each_adapter_alone(xp: Any) -> None:
    """BankAdamW over mixed batches ends where vn.AdamW on each adapter's rows alone ends (decay included)."""
    model = build_bank(xp)
    singles = {name: model.adapter(name) for name in ADAPTERS}
    rng = np.random.default_rng(2)
    data = [(rng.standard_normal((len(rows), 5)), rng.integers(0, 3, len(rows))) for rows in SCHEDULE]
    net = network(model)
    opt = vn.BankAdamW(model, lr=0.05, weight_decay=0.1)
    for rows, (x, labels) in zip(SCHEDULE, data, strict=True):
        model.zero_grad()
        model.use(rows)
        logits = net.forward(from_numpy(xp, x))
        net.backward(_sum_loss_grad(logits, from_numpy(xp, labels)), input_grad=False)
        opt.step()
    for name, single in singles.items():
        single_net = network(single)
        single_opt = vn.AdamW(single.parameters(), lr=0.05, weight_decay=0.1)
        for rows, (x, labels) in zip(SCHEDULE, data, strict=True):
            picked = [i for i, row in enumerate(rows) if row == name]
            if not picked:
                continue
            single.zero_grad()
            logits = single_net.forward(from_numpy(xp, x[picked]))
            single_net.backward(_sum_loss_grad(logits, from_numpy(xp, labels[picked])), input_grad=False)
            single_opt.step(single.grads())
        got = model.vectors(name)
        for key, want in single.parameters().items():
            np.testing.assert_allclose(to_numpy(got[key]), to_numpy(want), rtol=1e-9, atol=1e-12, err_msg=key)


def test_absent_adapters_stay_bit_identical(xp: Any) -> None:
    model = build_bank(xp)
    before = {k: to_numpy(v).copy() for k, v in model.vectors("b").items()}
    net, opt = network(model), vn.BankAdamW(model, lr=0.1, weight_decay=0.5)
    for _ in range(3):
        model.zero_grad()
        model.use(["a", "c", "__base__"])
        net.backward(net.forward(from_numpy(xp, np.ones((3, 5)))), input_grad=False)
        opt.step()
    after = {k: to_numpy(v) for k, v in model.vectors("b").items()}
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert not np.array_equal(to_numpy(model.vectors("a")["head.lambda_b"]), before["head.lambda_b"] * 0 + 1e9)


def test_gradients_accumulate_over_two_selections(xp: Any) -> None:
    """Two backward passes (two selections) before zero_grad sum to one pass over both batches."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((len(ROWS), 5))
    model = build_bank(xp)
    net = network(model)
    halves = (slice(0, 4), slice(4, None))
    for part in halves:
        model.use(ROWS[part])
        net.backward(net.forward(from_numpy(xp, x[part])), input_grad=False)
    twice = {k: _dense(v, model) for k, v in model.grads().items()}
    model.zero_grad()
    model.use(ROWS)
    net.backward(net.forward(from_numpy(xp, x)), input_grad=False)
    once = {k: _dense(v, model) for k, v in model.grads().items()}
    assert twice.keys() == once.keys()
    for name in once:
        np.testing.assert_allclose(twice[name], once[name], atol=1e-12, err_msg=name)


def _dense(grad: vn.RowGrad, model: vn.BankModel) -> np.ndarray:
    """The gradient as a host array of every row (rows it lacks are zero)."""
    grad = grad.coalesced()
    rows, values = to_numpy(grad.rows), to_numpy(grad.values)
    assert len(set(rows.tolist())) == len(rows)
    dense = np.zeros((model.state.slots.capacity, *values.shape[1:]))
    dense[rows] = values
    return dense


def test_adding_and_deleting_touch_one_row(xp: Any) -> None:
    """Rows are reused: delete then add keeps the capacity and every other row bit-identical."""
    model = vn.BankModel(weight_dict(xp))
    for i in range(40):
        model.add_vera(f"a{i}", list(LAYERS), r=4, dvora=i % 3 == 0)
    capacity = model.state.slots.capacity
    model.load_vectors("a7", {k: v + 1.0 for k, v in model.vectors("a7").items()})
    keep = {k: to_numpy(v).copy() for k, v in model.vectors("a7").items()}
    model.delete_adapter("a3")
    model.add_vera("new", list(LAYERS), r=2, bias="vera_only")
    assert model.state.slots.slot("new") == 3 and model.state.slots.capacity == capacity
    assert all(np.array_equal(keep[k], to_numpy(v)) for k, v in model.vectors("a7").items())
    new = {k: to_numpy(v) for k, v in model.vectors("new").items()}
    assert all(np.all(v == 0.1) for k, v in new.items() if k.endswith("lambda_d"))
    assert all(v.shape == (2,) for k, v in new.items() if k.endswith("lambda_d"))
    assert np.array_equal(new["head.bias"], to_numpy(weight_dict(xp)["head.bias"]))
    assert len(model) == 40 and len(model.keys) == 1
    assert "magnitude" not in {k.rsplit(".", 1)[1] for k in new}


def test_an_adapter_in_a_reused_row_starts_with_fresh_optimizer_state(xp: Any) -> None:
    model = vn.BankModel(weight_dict(xp))
    model.add_vera("a", list(LAYERS), r=2)
    model.add_vera("keep", list(LAYERS), r=2)
    net, opt = network(model), vn.BankAdamW(model, lr=0.1, weight_decay=0.0)
    x = from_numpy(xp, np.ones((2, 5)))

    def train_step(rows: list[str]) -> None:
        model.zero_grad()
        model.use(rows)
        net.backward(net.forward(x), input_grad=False)
        opt.step()

    train_step(["a", "a"])
    train_step(["a", "a"])
    model.delete_adapter("a")
    model.add_vera("b", list(LAYERS), r=2)
    assert model.state.slots.slot("b") == 0
    train_step(["b", "b"])
    fresh = vn.BankModel(weight_dict(xp))
    fresh.add_vera("b", list(LAYERS), r=2)
    fresh_net, fresh_opt = network(fresh), vn.BankAdamW(fresh, lr=0.1, weight_decay=0.0)
    fresh.use(["b", "b"])
    fresh_net.backward(fresh_net.forward(x), input_grad=False)
    fresh_opt.step()
    for key, want in fresh.vectors("b").items():
        np.testing.assert_array_equal(to_numpy(model.vectors("b")[key]), to_numpy(want), err_msg=key)


def test_merged_adapter_serves_its_rows(xp: Any) -> None:
    """An adapter taken out of the bank and merged gives the bank's output for its rows."""
    model = build_bank(xp)
    x = from_numpy(xp, np.random.default_rng(4).standard_normal((3, 5)))
    model.use("d")
    y = to_numpy(network(model).forward(x))
    merged = model.adapter("d").merge()
    plain = vn.Sequential(
        *(
            layer
            for name in LAYERS
            for layer in (vn.Linear(merged[f"{name}.weight"], merged[f"{name}.bias"], trainable=False), vn.ReLU())
        )
    )
    plain.children.pop(str(len(plain.children) - 1))  # no ReLU after the head
    np.testing.assert_allclose(to_numpy(plain.forward(x)), y, rtol=1e-9, atol=1e-9)


def test_dropout_is_per_row(xp: Any) -> None:
    model = vn.BankModel(weight_dict(xp))
    model.add_vera("wet", list(LAYERS), r=4, dropout=0.5)
    model.add_vera("dry", list(LAYERS), r=4)
    for name in ("wet", "dry"):
        model.load_vectors(name, {k: v + 1.0 for k, v in model.vectors(name).items()})
    net = network(model)
    x = from_numpy(xp, np.ones((4, 5)))
    model.use(["wet", "dry", "wet", "dry"])
    trained = to_numpy(net.train().forward(x))
    evaluated = to_numpy(net.eval().forward(x))
    np.testing.assert_allclose(trained[[1, 3]], evaluated[[1, 3]], atol=1e-12)
    assert not np.allclose(trained[[0, 2]], evaluated[[0, 2]])


def test_bank_errors_change_nothing(xp: Any, tmp_path: Path) -> None:
    model = build_bank(xp)
    before = {k: to_numpy(v).copy() for k, v in model.parameters().items()}
    with pytest.raises(ValueError, match="already holds an adapter named 'a'"):
        model.add_vera("a", list(LAYERS), r=2)
    with pytest.raises(ValueError, match="bias must be one of"):
        model.add_vera("z", list(LAYERS), r=2, bias="all")
    with pytest.raises(ValueError, match="Python identifier other than '__base__'"):
        model.add_vera("__base__", list(LAYERS), r=2)
    with pytest.raises(ValueError, match="r must be a positive int"):
        model.add_vera("z", list(LAYERS), r=0)
    with pytest.raises(KeyError, match=r"unknown adapters \['nobody'\]"):
        model.use(["a", "nobody"])
    with pytest.raises(ValueError, match="slots that hold no adapter"):
        model.use(np.asarray([0, 99]))
    model.use(["a", "b"])
    with pytest.raises(ValueError, match="the selection has 2 rows but the batch has 3"):
        model.layer("head").forward(from_numpy(xp, np.ones((3, 6))))
    with pytest.raises(ValueError, match=r"has shape \(4,\), got \(2,\)"):
        model.load_vectors("a", {"head.lambda_d": from_numpy(xp, np.ones(2))})
    with pytest.raises(RuntimeError, match="backward called before forward"):
        vn.BankModel(weight_dict(xp)).layer("head").backward(from_numpy(xp, np.ones((1, 3))))
    assert all(np.array_equal(before[k], to_numpy(v)) for k, v in model.parameters().items())
    assert len(model) == len(ADAPTERS)


def test_bias_all_files_are_refused(tmp_path: Path) -> None:
    import array_api_compat.numpy as xp

    single = vn.add_vera(weight_dict(xp), ["head"], r=2, bias="all")
    path = tmp_path / "all.safetensors"
    single.save(path)
    model = vn.BankModel(weight_dict(xp))
    config = read_adapter(path).config
    if config.bias_modules:
        with pytest.raises(vn.weights.AdapterFileError, match="trains biases outside its adapted layers"):
            model.load_adapter(path, "x")
        assert len(model) == 0


# ---------------------------------------------------------------------------- files, and vera_torch


def test_files_round_trip(xp: Any, tmp_path: Path) -> None:
    """Save every adapter, load into a new bank: the same vectors bit for bit, the same outputs."""
    model = build_bank(xp)
    fresh = vn.BankModel(weight_dict(xp))
    for name in ADAPTERS:
        model.save_adapter(tmp_path / f"{name}.safetensors", name)
        fresh.load_adapter(tmp_path / f"{name}.safetensors", name)
    for name in ADAPTERS:
        for key, value in model.vectors(name).items():
            assert np.array_equal(to_numpy(fresh.vectors(name)[key]), to_numpy(value)), key
    x = from_numpy(xp, np.random.default_rng(5).standard_normal((len(ROWS), 5)))
    model.use(ROWS)
    fresh.use(ROWS)
    np.testing.assert_array_equal(to_numpy(network(fresh).forward(x)), to_numpy(network(model).forward(x)))
    single = vn.AdaptedModel.load(tmp_path / "d.safetensors", weight_dict(xp))
    assert all(np.array_equal(to_numpy(v), to_numpy(model.vectors("d")[k])) for k, v in single.parameters().items())


torch_only = pytest.mark.requires("torch")


def _torch_model(weights: dict[str, np.ndarray]) -> Any:
    import torch
    from torch import nn

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.ModuleList([nn.Module(), nn.Module()])
            self.enc[0].fc = nn.Linear(5, 7).double()
            self.enc[1].fc = nn.Linear(7, 6).double()
            self.head = nn.Linear(6, 3).double()

        def forward(self, x: Any) -> Any:
            x = torch.relu(self.enc[0].fc(x))
            return self.head(torch.relu(self.enc[1].fc(x)))

    model = Mlp()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items() if k != "norm.weight"})
    return model


def _numpy_weights() -> dict[str, np.ndarray]:
    import array_api_compat.numpy as xp

    return {k: np.asarray(v) for k, v in weight_dict(xp).items()}


@torch_only
def test_numpy_bank_files_load_in_torch_bit_identically(tmp_path: Path) -> None:
    import torch

    import vera_torch as vt

    model = build_bank(__import__("array_api_compat.numpy", fromlist=["numpy"]))
    torch_model = _torch_model(_numpy_weights())
    for name in ADAPTERS:
        model.save_adapter(tmp_path / f"{name}.safetensors", name)
        vt.load_adapter(torch_model, tmp_path / f"{name}.safetensors", name)
    layers = vt.vera_layers(torch_model)
    for name in ADAPTERS:
        for key, value in model.vectors(name).items():
            layer, kind = key.rsplit(".", 1)
            got = layers[layer].vectors(name)[kind].detach().numpy()
            assert got.dtype == value.dtype and np.array_equal(got, np.asarray(value)), (name, key)
        vt.save_adapter(torch_model, tmp_path / f"{name}.torch.safetensors", name)
        ours = read_adapter(tmp_path / f"{name}.safetensors").vectors
        theirs = read_adapter(tmp_path / f"{name}.torch.safetensors").vectors
        assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    x = np.random.default_rng(6).standard_normal((len(ROWS), 5))
    model.use(ROWS)
    want = np.asarray(network(model).forward(x))
    with torch.no_grad():
        got = torch_model(torch.from_numpy(x), adapter_names=ROWS).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@torch_only
def test_torch_bank_files_load_in_numpy_bit_identically(tmp_path: Path) -> None:
    import torch

    import vera_torch as vt

    torch_model = _torch_model(_numpy_weights())
    generator = torch.Generator().manual_seed(0)
    for name, options in ADAPTERS.items():
        options = dict(options)
        targets = options.pop("target_modules", list(LAYERS))
        vt.add_vera(torch_model, targets, adapter_name=name, **options)
    for name in ADAPTERS:
        for layer in vt.vera_layers(torch_model).values():
            if layer.has_adapter(name):
                for vector in layer.vectors(name).values():
                    with torch.no_grad():
                        vector.mul_(torch.empty_like(vector).uniform_(0.5, 1.5, generator=generator))
                        vector.add_(torch.empty_like(vector).uniform_(-0.1, 0.1, generator=generator))
    model = vn.BankModel(_numpy_weights())
    for name in ADAPTERS:
        vt.save_adapter(torch_model, tmp_path / f"{name}.safetensors", name)
        model.load_adapter(tmp_path / f"{name}.safetensors", name)
        layers = vt.vera_layers(torch_model)
        for key, value in model.vectors(name).items():
            layer, kind = key.rsplit(".", 1)
            want = layers[layer].vectors(name)[kind].detach().numpy()
            assert np.array_equal(np.asarray(value), want), (name, key)
    assert len(model.keys) == 2  # the pairs of seeds 0 and 5, each held once
    x = np.random.default_rng(7).standard_normal((len(ROWS), 5))
    model.use(ROWS)
    with torch.no_grad():
        want = torch_model(torch.from_numpy(x), adapter_names=ROWS).numpy()
    np.testing.assert_allclose(np.asarray(network(model).forward(x)), want, rtol=1e-10, atol=1e-10)


@torch_only
def test_bank_adamw_matches_torch_bank_adamw(tmp_path: Path) -> None:
    """The same adapters, batches and loss on both banks: the same vectors after three steps."""
    import torch

    import vera_torch as vt

    xp = __import__("array_api_compat.numpy", fromlist=["numpy"])
    model = build_bank(xp)
    torch_model = _torch_model(_numpy_weights())
    for name in ADAPTERS:
        model.save_adapter(tmp_path / f"{name}.safetensors", name)
        vt.load_adapter(torch_model, tmp_path / f"{name}.safetensors", name)
    vt.set_adapter(torch_model, list(ADAPTERS))
    torch_opt = vt.BankAdamW([p for p in torch_model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    net, opt = network(model), vn.BankAdamW(model, lr=0.05, weight_decay=0.1)
    rng = np.random.default_rng(8)
    for rows in SCHEDULE:
        x, labels = rng.standard_normal((len(rows), 5)), rng.integers(0, 3, len(rows))
        model.zero_grad()
        model.use(rows)
        net.backward(_sum_loss_grad(net.forward(x), labels), input_grad=False)
        opt.step()
        torch_opt.zero_grad()
        logits = torch_model(torch.from_numpy(x), adapter_names=rows)
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels), reduction="sum").backward()
        torch_opt.step()
    layers = vt.vera_layers(torch_model)
    for name in ADAPTERS:
        for key, value in model.vectors(name).items():
            layer, kind = key.rsplit(".", 1)
            want = layers[layer].vectors(name)[kind].detach().numpy()
            np.testing.assert_allclose(np.asarray(value), want, rtol=1e-9, atol=1e-12, err_msg=f"{name} {key}")
