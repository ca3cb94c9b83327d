"""add_vera, the layers and adapter management on small models."""

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch_helpers import (  # noqa: E402
    Conv1D,
    Int8Linear,
    TinyLM,
    one_adapter_per_row,
    randomize_vectors,
    vector_grads,
)

import vera_core as vc  # noqa: E402
import vera_torch as vt  # noqa: E402
from vera_torch.layers import VeraLinear  # noqa: E402


def _ids(seed=0, batch=3, seq=5, vocab=11):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _lm(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TinyLM(**kwargs)


def test_initial_model_is_unchanged_and_only_vectors_train():
    model = _lm()
    bare = copy.deepcopy(model)
    vt.add_vera(model, target_modules=["q_proj", "v_proj"], r=4)
    torch.testing.assert_close(model(_ids()), bare(_ids()), rtol=0, atol=0)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".vera_banks." in n and n.endswith((".lambda_d", ".lambda_b")) for n in trainable)
    report = vt.trainable_parameters(model)
    assert report.trainable == 4 * (4 + 16) == report.by_adapter["default"]
    assert "trainable params: 80" in str(report)


def test_forward_equals_delta_weight():
    model = _lm()
    vt.add_vera(model, target_modules="all-linear", r=4, seed=7)
    randomize_vectors(model)
    layer = model.layers[0].up
    x = torch.randn(2, 16)
    A, B = model.vera_state.projections.get(model.vera_state.settings["default"].key)
    vectors = layer.vectors("default")
    want = layer.base_layer(x) + x @ vc.delta_weight(A, B, vectors["lambda_d"], vectors["lambda_b"], 16).T
    torch.testing.assert_close(layer(x), want)


def test_target_matching_like_peft():
    names = lambda m: sorted(vt.vera_layers(m))  # noqa: E731
    assert names(vt.add_vera(_lm(), "all-linear", r=2)) == sorted(
        f"layers.{i}.{k}" for i in range(2) for k in ("q_proj", "v_proj", "up", "down")
    )  # lm_head excluded
    assert names(vt.add_vera(_lm(), r"layers\.1\.(up|down)", r=2)) == ["layers.1.down", "layers.1.up"]
    assert names(vt.add_vera(_lm(), ["up"], r=2, layers_to_transform=[0], layers_pattern="layers")) == ["layers.0.up"]
    assert names(vt.add_vera(_lm(), ["lm_head"], r=2)) == ["lm_head"]


def test_errors_name_the_problem_and_change_nothing():
    model = _lm()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"matches none of .*q_proj"):
        vt.add_vera(model, target_modules=["nope"], r=2)
    with pytest.raises(ValueError, match=r"not linear-like.*Embedding"):
        vt.add_vera(model, target_modules=["embed"], r=2)
    with pytest.raises(ValueError, match="target_modules is required"):
        vt.add_vera(model, r=2)
    with pytest.raises(ValueError, match="r must be a positive int"):
        vt.add_vera(model, ["q_proj"], r=0)
    with pytest.raises(ValueError, match="bias must be one of"):
        vt.add_vera(model, ["q_proj"], bias="some")
    assert not hasattr(model, "vera_state") and not vt.vera_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_one_shared_pair_held_once_not_in_state_dict():
    model = vt.add_vera(_lm(), "all-linear", r=4)
    store = model.vera_state.projections
    assert len(store) == 1
    key = next(iter(store.keys_by_name.values()))
    assert (key.r, key.max_in, key.max_out) == (4, 32, 32)
    assert not any("vera_A" in k or ("proj" in k and "A" in k.split(".")[-1]) for k in model.state_dict())
    A, B = store.get(key)
    want_A, want_B = vc.generate_projections(0, 4, 32, 32, xp=vt.projections.xp_torch)
    assert torch.equal(A, want_A) and torch.equal(B, want_B)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "vera" not in n)


def test_conv1d_layout():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 8), nn.ReLU(), Conv1D(8, 12))
    vt.add_vera(model, "all-linear", r=4)
    randomize_vectors(model)
    layer = model[0]
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (8, 12)
    x = torch.randn(3, 8)
    A, B = model.vera_state.projections.get(model.vera_state.settings["default"].key)
    vectors = layer.vectors("default")
    delta = vc.delta_weight(A, B, vectors["lambda_d"], vectors["lambda_b"], 8, fan_in_fan_out=True)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta)
    y_before = model(x)
    vt.merge_adapter(model)
    torch.testing.assert_close(model(x), y_before, atol=1e-5, rtol=1e-5)


def test_quantized_base_vera_without_weight_but_dvora_refuses():
    torch.manual_seed(0)
    model = nn.Sequential(Int8Linear(nn.Linear(8, 6)))
    vt.add_vera(model, ["0"], r=4)
    randomize_vectors(model)
    x = torch.randn(5, 8, requires_grad=True)
    model(x).sum().backward()
    assert ("0", "default", "lambda_b") in vector_grads(model) and x.grad is not None
    with pytest.raises(TypeError, match="dense floating-point weight"):
        vt.add_vera(nn.Sequential(Int8Linear(nn.Linear(8, 6))), ["0"], r=4, dvora=True)
    with pytest.raises(TypeError, match="merging needs the base layer's dense"):
        vt.merge_adapter(model)


def test_multiple_adapters_activate_disable_delete():
    model = _lm()
    bare = copy.deepcopy(model)
    vt.add_vera(model, ["q_proj"], r=4, adapter_name="a")
    vt.add_vera(model, ["q_proj", "up"], r=4, seed=1, adapter_name="b")
    randomize_vectors(model)
    assert vt.active_adapters(model) == ["a"]
    ids = _ids()
    y_a = model(ids)
    vt.set_adapter(model, "b")
    y_b = model(ids)
    assert not torch.allclose(y_a, y_b)
    key_b = model.vera_state.settings["b"].key.name  # b has its own pair (seed 1): its banks alone train
    assert all((key_b in n) == p.requires_grad for n, p in model.named_parameters())
    with vt.disable_adapters(model):
        torch.testing.assert_close(model(ids), bare(ids), rtol=0, atol=0)
        assert not any(p.requires_grad for p in model.parameters())
    assert all((key_b in n) == p.requires_grad for n, p in model.named_parameters())
    torch.testing.assert_close(model(ids), y_b, rtol=0, atol=0)
    assert len(model.vera_state.projections) == 2
    vt.delete_adapter(model, "b")
    assert len(model.vera_state.projections) == 1 and vt.active_adapters(model) == []
    vt.set_adapter(model, "a")
    torch.testing.assert_close(model(ids), y_a, rtol=0, atol=0)
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        vt.set_adapter(model, "b")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        vt.add_vera(model, ["q_proj"], r=4, adapter_name="a")


def test_different_ranks_share_the_pair_with_leading_slices():
    model = _lm()
    vt.add_vera(model, "all-linear", r=8, adapter_name="big")
    vt.add_vera(model, "all-linear", r=3, adapter_name="small")
    assert len(model.vera_state.projections) == 1
    randomize_vectors(model)
    vt.set_adapter(model, "small")
    layer = model.layers[1].down
    A, B = model.vera_state.projections.get(model.vera_state.settings["small"].key)
    assert A.shape == (8, 32) and layer.vectors("small")["lambda_d"].shape == (3,)
    x = torch.randn(4, 32)
    d, b = layer.vectors("small")["lambda_d"], layer.vectors("small")["lambda_b"]
    want = layer.base_layer(x) + b * ((d * (x @ A[:3, :32].T)) @ B[:16, :3].T)
    torch.testing.assert_close(layer(x), want)
    model(_ids()).sum().backward()
    bank, slot = layer.find("small")
    grad = bank.lambda_d.grad.to_dense()
    assert grad[slot, :3].abs().sum() > 0 and not grad[slot, 3:].any()  # the zero padding does not train
    assert not grad[layer.find("big")[1]].any()  # the inactive adapter's row has no gradient


def test_mixed_adapter_batch_matches_per_adapter_loop():
    model = _lm()
    vt.add_vera(model, "all-linear", r=8, adapter_name="a")
    vt.add_vera(model, "all-linear", r=5, adapter_name="b")
    vt.add_vera(model, ["up"], r=8, seed=3, adapter_name="c")  # another pair: its own group
    randomize_vectors(model)
    names = ["a", "b", "__base__", "c", "b", "a"]
    ids = _ids(batch=len(names))
    mixed = model(ids, adapter_names=names)
    torch.testing.assert_close(mixed, one_adapter_per_row(model, ids, names), atol=1e-5, rtol=1e-5)
    assert model.vera_state.shared.rows is None  # cleared after the call

    # a mixed batch trains: each row's loss reaches only its own adapter's rows
    vt.set_adapter(model, ["a", "b", "c"])
    for param in model.parameters():
        param.grad = None
    model(ids[:2], adapter_names=["a", "__base__"]).square().sum().backward()
    grads = vector_grads(model)
    assert any(name == "a" and g.abs().sum() > 0 for (_, name, _), g in grads.items())
    assert all(not g.any() for (_, name, _), g in grads.items() if name != "a")
    with pytest.raises(ValueError, match="unknown adapters"):
        model(ids, adapter_names=["zz"] * len(names))
    with pytest.raises(ValueError, match="one adapter name"):
        model(ids, adapter_names=["a"])


def test_merge_unmerge_safe_merge_and_unload():
    model = _lm()
    vt.add_vera(model, "all-linear", r=4)
    randomize_vectors(model)
    ids = _ids()
    y = model(ids)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    vt.merge_adapter(model)
    torch.testing.assert_close(model(ids), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        with vt.disable_adapters(model):
            pass
    vt.unmerge_adapter(model)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        model.layers[1].up.vectors("default")["lambda_b"][0] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.1\.up.*NaN or infinity.*no weight was changed"):
        vt.merge_adapter(model, safe=True)
    assert all(not layer.merged_adapters for layer in vt.vera_layers(model).values())
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        model.layers[1].up.vectors("default")["lambda_b"][0] = 0.0
    y = model(ids)
    bare = vt.merge_and_unload(model, safe=True)
    assert not vt.vera_layers(bare) and not hasattr(bare, "vera_state")
    assert type(bare.layers[0].up) is nn.Linear
    torch.testing.assert_close(bare(ids), y, atol=1e-5, rtol=1e-5)


def test_dvora_layer_initial_identity_training_and_merge():
    model = _lm()
    bare = copy.deepcopy(model)
    vt.add_vera(model, "all-linear", r=4, dvora=True)
    ids = _ids()
    torch.testing.assert_close(model(ids), bare(ids), atol=1e-5, rtol=1e-5)
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert any(n.endswith(".magnitude") for n in names)
    randomize_vectors(model)
    loss = model(ids).square().mean()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    y = model(ids)
    vt.merge_adapter(model)
    torch.testing.assert_close(model(ids), y, atol=1e-4, rtol=1e-4)
    vt.unmerge_adapter(model)
    torch.testing.assert_close(model(ids), y, atol=1e-4, rtol=1e-4)


def test_training_step_reduces_loss():
    model = _lm()
    vt.add_vera(model, "all-linear", r=8, d_initial=0.1, dropout=0.1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, target = _ids(), _ids(seed=1)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), target.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dvora", [False, True])
@pytest.mark.parametrize("bias", ["vera_only", "all"])
def test_bias_modes(bias, dvora):
    """The adapted layers' biases train as the adapter's own rows; ``"all"`` also trains the others."""
    model = vt.add_vera(_lm(), ["up"], r=2, bias=bias, dvora=dvora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "layers.0.up.base_layer.bias" not in trainable  # the adapter's copy trains instead
    assert ("layers.0.q_proj.bias" in trainable) == (bias == "all")
    torch.testing.assert_close(model.layers[0].up.vectors("default")["bias"], model.layers[0].up.base_layer.bias)
    model(_ids()).square().mean().backward()
    grad = vector_grads(model)["layers.0.up", "default", "bias"]
    assert torch.count_nonzero(grad) > 0


def test_activation_checkpointing_gives_the_same_gradients():
    from torch.utils.checkpoint import checkpoint

    model = vt.add_vera(_lm(), "all-linear", r=4)
    randomize_vectors(model)
    h = model.embed(_ids()).detach()
    params = [p for p in model.layers[0].parameters() if p.requires_grad]
    plain = torch.autograd.grad(model.layers[0](h).square().sum(), params)
    ckpt = torch.autograd.grad(checkpoint(model.layers[0], h, use_reentrant=False).square().sum(), params)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("detach_norm", [False, True])
def test_mixed_batch_with_dvora_rows_matches_per_adapter_loop(detach_norm: bool) -> None:
    """DVoRA rows (two adapters, ranks 8 and 4), VeRA rows and plain rows: outputs and every gradient."""
    model = vt.add_vera(_lm(), "all-linear", r=8, adapter_name="v")
    vt.add_vera(model, "all-linear", r=8, dvora=True, detach_norm=detach_norm, adapter_name="d")
    vt.add_vera(model, "all-linear", r=4, dvora=True, detach_norm=detach_norm, adapter_name="e")
    randomize_vectors(model)
    names = ["d", "v", "__base__", "e", "d"]
    ids = _ids(batch=len(names))
    vt.set_adapter(model, ["d", "v"])  # e is used but inactive: its rows must not train
    for param in model.parameters():
        param.grad = None
    mixed = model(ids, adapter_names=names)
    mixed.square().sum().backward()
    got = vector_grads(model)
    want: dict = {}
    reference = []
    for i, name in enumerate(names):  # each row alone, accumulating gradients row by row
        if name == "__base__":
            with vt.disable_adapters(model):
                reference.append(model(ids[i : i + 1]))
            continue
        vt.set_adapter(model, name)
        if name == "e":
            reference.append(model(ids[i : i + 1]).detach())
            continue
        for param in model.parameters():
            param.grad = None
        row = model(ids[i : i + 1])
        row.square().sum().backward()
        reference.append(row.detach())
        for key, grad in vector_grads(model).items():
            want[key] = want.get(key, 0) + grad
    torch.testing.assert_close(mixed, torch.cat(reference), atol=1e-5, rtol=1e-5)
    for key, expected in want.items():
        torch.testing.assert_close(got[key], expected, atol=1e-4, rtol=1e-4, msg=str(key))
    assert all(not g.any() for (_, name, _), g in got.items() if name == "e")
    magnitudes = [g for (_, name, kind), g in got.items() if kind == "magnitude" and name == "d"]
    assert magnitudes and all(float(g.abs().sum()) > 0 for g in magnitudes)


def test_mixed_batch_refuses_merged_adapters():
    model = vt.add_vera(_lm(), ["up"], r=2, adapter_name="v")
    vt.merge_adapter(model, ["v"])
    with pytest.raises(RuntimeError, match="unmerge first"):
        model(_ids(batch=2), adapter_names=["v", "v"])


def test_autocast_bfloat16_on_cpu():
    model = _lm()
    vt.add_vera(model, "all-linear", r=8, dvora=False)
    randomize_vectors(model)
    ids = _ids()
    y32 = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = model(ids)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.1, rtol=0.05)
    y16.float().square().mean().backward()
    grad = vector_grads(model)["layers.0.up", "default", "lambda_d"]
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


def test_autocast_bfloat16_dvora_on_cpu():
    model = vt.add_vera(_lm(), "all-linear", r=8, dvora=True)
    randomize_vectors(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(_ids())
    y.float().square().mean().backward()
    assert torch.isfinite(vector_grads(model)["layers.1.down", "default", "magnitude"]).all()


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_dvora_norm_pieces_stay_float32_under_autocast(model_dtype):
    """The Gram pieces of the norm are computed once, first under autocast here: still in float32."""
    model = vt.add_vera(_lm().to(model_dtype), "all-linear", r=8, dvora=True)
    randomize_vectors(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(_ids())
    layer = model.layers[1].down
    (_, frozen), *_ = layer._frozen_cache.values()
    assert [t.dtype for t in frozen] == [torch.float32] * 3
    weight = layer.weight.detach().float()
    A = model.vera_state.projections.get(layer.banks()[0].key, torch.float32, weight.device)[0]
    reference = vc.dvora_precompute(weight, A, 8)
    for got, want in zip(frozen, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_bfloat16_model_keeps_float32_vectors():
    model = _lm().to(torch.bfloat16)
    vt.add_vera(model, "all-linear", r=4)
    layer = model.layers[0].up
    assert layer.vectors("default")["lambda_d"].dtype == torch.float32
    randomize_vectors(model)
    y = model(_ids())
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert vector_grads(model)["layers.0.up", "default", "lambda_b"].dtype == torch.float32


def test_layer_is_a_drop_in_replacement():
    layer = model = vt.add_vera(nn.Sequential(nn.Linear(4, 3)), ["0"], r=2)[0]
    assert isinstance(layer, VeraLinear) and layer.weight is layer.base_layer.weight
    assert "rows=1/1, width=2, out=3" in repr(model)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("dvora", [False, True])
def test_torch_compile_fullgraph(dvora):
    """No graph breaks (fullgraph=True raises on one); aot_eager keeps the test fast on CPU."""
    model = _lm()
    vt.add_vera(model, "all-linear", r=8, dvora=dvora)
    randomize_vectors(model)
    ids = _ids()
    eager = model(ids)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(ids)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert ("layers.0.up", "default", "lambda_d") in vector_grads(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_bf16_matches_cpu():
    model = _lm()
    vt.add_vera(model, "all-linear", r=8)
    randomize_vectors(model)
    ids = _ids()
    y_cpu = model(ids)
    model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(ids.cuda())
    torch.testing.assert_close(y.float().cpu(), y_cpu, atol=0.1, rtol=0.05)
    A, _ = model.vera_state.projections.get(model.vera_state.settings["default"].key)
    assert A.device.type == "cuda"
    fresh = vt.add_vera(_lm().cuda(), "all-linear", r=8)
    A2, _ = fresh.vera_state.projections.get(fresh.vera_state.settings["default"].key)
    assert torch.equal(A2.cpu(), A.cpu())  # generated on the GPU, bit-identical


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_inductor_fullgraph():
    model = _lm()
    vt.add_vera(model, "all-linear", r=8)
    randomize_vectors(model)
    ids = _ids()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(ids)
    torch.testing.assert_close(out, model(ids))
    out.sum().backward()


def test_float64_model_uses_cached_cast_of_the_float32_master():
    model = _lm()
    vt.add_vera(model, "all-linear", r=4)
    randomize_vectors(model)
    y32 = model(_ids())
    model.double()
    key = model.vera_state.settings["default"].key
    assert model.vera_state.projections.get(key)[0].dtype == torch.float32  # master unchanged
    y64 = model(_ids())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, atol=1e-5, rtol=1e-5)
    A64, _ = model.vera_state.projections.get(key, torch.float64)
    assert A64 is model.vera_state.projections.get(key, torch.float64)[0]  # cached
