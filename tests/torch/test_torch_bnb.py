"""Quantized bases with bitsandbytes on the CPU: ``vera_torch.quantized`` against bitsandbytes itself.

Runs in the ``bnb`` nox session (which installs bitsandbytes); skips elsewhere.
"""

import copy

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")

from torch import nn  # noqa: E402
from torch.nn import functional  # noqa: E402

import vera_torch as vt  # noqa: E402
from vera_torch import quantized as vq  # noqa: E402

KINDS = ("nf4", "fp4", "int8")
FOUR_BIT = ("nf4", "fp4")
# bitsandbytes' CPU repacking asserts outputs a multiple of 32 and fails on inputs not a multiple of the
# block size 64 (both layers of the model below qualify); three blocks a row exercise the scales' layout
OUT, IN = 128, 192
AVX512_BF16 = bool(bnb.functional.has_avx512bf16())


def make_layer(kind, *, bias=True, seed=0, compute_dtype=torch.float32, source_dtype=torch.float32):
    """(the dense nn.Linear, the same weights quantized by bitsandbytes on the CPU), in training mode."""
    torch.manual_seed(seed)
    dense = nn.Linear(IN, OUT, bias=bias).to(source_dtype)
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(IN, OUT, bias=bias, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(IN, OUT, bias=bias, quant_type=kind, compute_dtype=compute_dtype)
    layer.load_state_dict(dense.state_dict())
    return dense, layer.to("cpu").train()


def snapshot(layer):
    """Everything that makes up the layer's quantized state, copied."""
    weight = layer.weight
    parts = {"data": weight.data.clone(), "bias": None if layer.bias is None else layer.bias.detach().clone()}
    state = getattr(weight, "quant_state", None)
    if state is not None:
        parts["state"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(state).items()}
    if hasattr(layer, "state"):
        parts["SCB"] = None if layer.state.SCB is None else layer.state.SCB.clone()
        parts["weight_SCB"] = None if getattr(weight, "SCB", None) is None else weight.SCB.clone()
    return parts


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif key not in ("state2",):
            assert a[key] == b[key], key


def test_quantization_tells_quantized_layers_apart():
    for kind in KINDS:
        assert vq.quantization(make_layer(kind)[1]) == kind
    assert vq.quantization(nn.Linear(4, 4)) is None
    assert vq.quantization(bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=True)) is None
    not_yet = bnb.nn.Linear4bit(IN, OUT, quant_type="nf4")  # bitsandbytes quantizes on .to(device)
    with pytest.raises(ValueError, match="no quantized weight yet"):
        vq.dequantize(not_yet)
    with pytest.raises(TypeError, match="not a quantized layer"):
        vq.dequantize(nn.Linear(4, 4))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_dequantized_weight_reproduces_the_layers_forward(kind, bias):
    """``linear(x, W, b)`` with the dequantized W is bit for bit the layer's training forward,
    with and without input gradients; W is the dense weight up to the quantization error;
    reading it changes nothing in the layer."""
    dense, layer = make_layer(kind, bias=bias)
    before = snapshot(layer)
    weight, b = vq.dequantize(layer)
    assert_same_state(before, snapshot(layer))
    assert weight.dtype == torch.float32 and tuple(weight.shape) == (OUT, IN)
    assert (b is None) == (not bias)
    if bias:
        assert torch.equal(b, dense.bias.detach())
    x = torch.randn(5, 7, IN)
    assert torch.equal(layer(x), functional.linear(x, weight, b))
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    assert torch.equal(y, functional.linear(x, weight, b))
    y.square().sum().backward()
    xr = x.clone().requires_grad_(True)
    functional.linear(xr, weight, b).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)
    bound = {"nf4": 0.2, "fp4": 0.3, "int8": 0.01}[kind]  # the quantization error, relative to max |W|
    error = (weight - dense.weight.detach()).abs().max() / dense.weight.detach().abs().max()
    assert 0 < error < bound


@pytest.mark.parametrize("kind", FOUR_BIT)
def test_dequantized_weight_under_bfloat16_compute(kind):
    """With ``compute_dtype=bfloat16`` the layer multiplies by W rounded to bfloat16 once."""
    _, layer = make_layer(kind, compute_dtype=torch.bfloat16)
    weight, b = vq.dequantize(layer)
    x = torch.randn(6, IN)
    expected = functional.linear(x.bfloat16(), weight.bfloat16(), b.bfloat16()).float()
    assert torch.equal(layer(x), expected)


@pytest.mark.skipif(not AVX512_BF16, reason="bitsandbytes repacks 4-bit layers only on CPUs with AVX512-BF16")
@pytest.mark.parametrize("kind", FOUR_BIT)
def test_cpu_repacking_is_read_and_undone(kind):
    """An eval forward repacks the layer (bfloat16 scales, no more gradients). ``dequantize`` reads
    the repacked weight: the codes times the scales rounded to bfloat16 (computed here from the
    layer before repacking). ``restore_training_layout`` keeps that weight bit for bit, trains
    again, and the layer no longer repacks."""
    _, layer = make_layer(kind)
    state = copy.deepcopy(layer.weight.quant_state)
    scales = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    codes = layer.weight.data.clone()
    expected = torch.ops.bitsandbytes.dequantize_4bit.default(
        codes, scales.bfloat16().float(), state.blocksize, state.quant_type, state.shape, torch.float32
    )
    x = torch.randn(4, IN)
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    assert layer.weight.quant_state.packing_format_for_cpu, "bitsandbytes did not repack: the premise changed"
    repacked = snapshot(layer)
    weight, b = vq.dequantize(layer)
    assert_same_state(repacked, snapshot(layer))
    assert torch.equal(weight, expected)
    torch.testing.assert_close(y, functional.linear(x, weight, b), rtol=2e-2, atol=2e-2)  # a bfloat16 kernel
    stamp = vq.state_stamp(layer)

    assert vq.restore_training_layout(layer) is True
    assert vq.state_stamp(layer) != stamp
    assert torch.equal(vq.dequantize(layer).weight, expected)
    layer.train()
    xg = x.clone().requires_grad_(True)
    out = layer(xg)
    assert torch.equal(out, functional.linear(x, weight, b))
    out.sum().backward()
    assert xg.grad is not None
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert not layer.weight.quant_state.packing_format_for_cpu
    assert vq.restore_training_layout(layer) is False


@pytest.mark.parametrize("kind", KINDS)
def test_requantize_round_trips_and_reports_its_error(kind):
    """Requantizing the dequantized weight changes it by at most a little (4-bit: the nested
    scale statistics are re-quantized); a new weight lands with the error reported, which is
    exactly max |dequantize - target|, and the settings are kept."""
    _, layer = make_layer(kind)
    settings = _settings(layer)
    weight, b = vq.dequantize(layer)
    assert vq.requantize(layer, weight) <= 1e-3 * float(weight.abs().max())
    target = weight + 0.02 * torch.randn(OUT, IN, generator=torch.Generator().manual_seed(3))
    error = vq.requantize(layer, target)
    now = vq.dequantize(layer).weight
    assert error == float((now - target).abs().max())
    assert 0 < error < 0.2 * float(target.abs().max())
    assert _settings(layer) == settings
    x = torch.randn(8, IN)
    assert torch.equal(layer(x), functional.linear(x, now, b))
    limit = error * x.abs().sum(dim=1, keepdim=True) + 1e-5  # |x (W - T)^T| <= max|W - T| * |x|_1
    assert bool(((layer(x) - functional.linear(x, target, b)).abs() <= limit).all())


def _settings(layer):
    if isinstance(layer, bnb.nn.Linear4bit):
        s = layer.weight.quant_state
        return (s.quant_type, s.blocksize, s.nested, s.dtype, layer.weight.quant_storage, layer.compute_dtype)
    return (layer.weight.dtype, layer.state.has_fp16_weights, layer.state.threshold)


@pytest.mark.parametrize("kind", KINDS)
def test_requantize_refuses_bad_weights_and_changes_nothing(kind):
    _, layer = make_layer(kind)
    before = snapshot(layer)
    weight = vq.dequantize(layer).weight
    bad = weight.clone()
    bad[0, 0] = float("nan")
    for wrong, message in ((weight.T, "shape"), (bad, "NaN"), (weight.to(torch.int32), "floating-point")):
        with pytest.raises(ValueError, match=message):
            vq.requantize(layer, wrong)
        assert_same_state(before, snapshot(layer))


@pytest.mark.parametrize("kind", KINDS)
def test_to_dense_matches_the_layer(kind):
    _, layer = make_layer(kind)
    dense = vq.to_dense(layer)
    assert type(dense) is nn.Linear and not dense.weight.requires_grad
    x = torch.randn(3, 5, IN)
    assert torch.equal(dense(x), layer(x))
    half = vq.to_dense(layer, torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16
    assert torch.equal(half.weight, vq.dequantize(layer).weight.bfloat16())


def _pair(kind, *, dvora, adapters=("default",)):
    """(the adapted quantized model, the same adapters on its dequantized dense copy), equal vectors."""
    _, layer = make_layer(kind)
    dense_layer = vq.to_dense(layer)
    models = []
    for base in (layer, dense_layer):
        model = nn.Sequential(base)
        for i, name in enumerate(adapters):
            vt.add_vera(model, ["0"], r=16, seed=4, dvora=dvora and i % 2 == 0, adapter_name=name)
        _randomize(model)
        models.append(model)
    return models


@pytest.mark.parametrize("kind", KINDS)
def test_dvora_on_a_quantized_base_equals_dvora_on_its_dense_weight(kind, monkeypatch):
    """Outputs and every gradient (x, magnitude, lambda_d, lambda_b) equal DVoRA on the dequantized
    dense layer to float32 round-off; the Gram pieces come from one dequantization, the forward stays
    on the quantized layer, whose state no step changes."""
    quantized_model, dense_model = _pair(kind, dvora=True)
    layer = quantized_model[0].base_layer
    stamp = vq.state_stamp(layer)
    calls = []
    original = vq.dequantize
    monkeypatch.setattr(vq, "dequantize", lambda module: calls.append(1) or original(module))
    for step in range(3):
        x = torch.randn(4, 6, IN, generator=torch.Generator().manual_seed(step))
        xq, xd = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yq, yd = quantized_model(xq), dense_model(xd)
        torch.testing.assert_close(yq, yd, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(yd)
        (yq * g).sum().backward()
        (yd * g).sum().backward()
        torch.testing.assert_close(xq.grad, xd.grad, rtol=1e-5, atol=1e-5)
    for kind_name in ("magnitude", "lambda_d", "lambda_b"):
        got = _grad(quantized_model, kind_name)
        torch.testing.assert_close(got, _grad(dense_model, kind_name), rtol=1e-4, atol=1e-5)
        assert got.abs().sum() > 0
    assert len(calls) == 1  # the Gram pieces: one dequantization for three steps
    assert vq.state_stamp(layer) == stamp


def _grad(model, kind):
    bank = model[0].banks()[0]
    grad = bank.parameters_by_kind()[kind].grad
    return grad.to_dense() if grad.is_sparse else grad


def _randomize(model):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in vt.vera_layers(model).values():
            for name in layer.adapter_names():
                for kind, vector in layer.vectors(name).items():
                    values = torch.randn(vector.shape, generator=generator) * 0.5
                    vector.copy_(values.abs() + 0.5 if kind == "magnitude" else values)


@pytest.mark.parametrize("dvora", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_into_quantized_and_unload_to_dense(kind, dvora):
    """merge_and_unload on a quantized base: into the quantized layer (dequantize, add, quantize
    again; the reported weight error bounds the output change), or to a dense nn.Linear holding
    W0 + dW (equal to the unmerged model to float32 round-off). merge/unmerge_adapter round-trip."""
    quantized_model, _ = _pair(kind, dvora=dvora)
    x = torch.randn(8, IN)
    with torch.no_grad():
        unmerged = quantized_model(x)
    dense = vt.merge_and_unload(copy.deepcopy(quantized_model), quantized_base="dense")
    assert type(dense[0]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(dense(x), unmerged, rtol=1e-5, atol=1e-5)

    errors = {}
    merged_model = vt.merge_and_unload(copy.deepcopy(quantized_model), errors=errors)
    assert vq.quantization(merged_model[0]) == kind and errors["0"] > 0
    with torch.no_grad():
        change = (merged_model(x) - unmerged).abs()
    assert bool((change <= errors["0"] * x.abs().sum(dim=1, keepdim=True) + 1e-4).all())
    assert float(change.max()) > 0

    before = vq.dequantize(quantized_model[0].base_layer).weight
    merge_errors = vt.merge_adapter(quantized_model)
    with torch.no_grad():
        torch.testing.assert_close(
            quantized_model(x), unmerged, rtol=0, atol=float(merge_errors["0"] * x.abs().sum(1).max()) + 1e-4
        )
    unmerge_errors = vt.unmerge_adapter(quantized_model)
    after = vq.dequantize(quantized_model[0].base_layer).weight
    bound = merge_errors["0"] + unmerge_errors["0"]
    assert float((after - before).abs().max()) <= bound * (1 + 1e-3) + 1e-6  # DVoRA's n/m rescales


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_mixed_adapter_batches_on_a_quantized_base(kind):
    """VeRA and DVoRA rows (and base rows) in one batch on a quantized base equal each row alone."""
    quantized_model, dense_model = _pair(kind, dvora=True, adapters=("d", "v", "e"))
    names = ["d", "v", "__base__", "e", "v"]
    x = torch.randn(len(names), 3, IN)
    with torch.no_grad():
        mixed = quantized_model(x, adapter_names=names)
        torch.testing.assert_close(mixed, dense_model(x, adapter_names=names), rtol=1e-5, atol=1e-5)
        for i, name in enumerate(names):
            if name == "__base__":
                with vt.disable_adapters(quantized_model):
                    alone = quantized_model(x[i : i + 1])
            else:
                vt.set_adapter(quantized_model, name)
                alone = quantized_model(x[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_a_dvora_file_trained_on_nf4_loads_onto_the_dense_base(tmp_path):
    """Files are interchangeable: DVoRA trained on a 4-bit base, saved, loaded onto the dense base."""
    quantized_model, _ = _pair("nf4", dvora=True)
    opt = vt.BankAdamW([p for p in quantized_model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(16, IN)
    for _ in range(3):
        opt.zero_grad()
        quantized_model(x).square().mean().backward()
        opt.step()
    vt.save_adapter(quantized_model, tmp_path / "q.safetensors")
    dense = nn.Sequential(vq.to_dense(quantized_model[0].base_layer))
    vt.load_adapter(dense, tmp_path / "q.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(dense(x), quantized_model(x), rtol=1e-5, atol=1e-5)


def test_vera_trains_on_nf4_and_its_file_loads_onto_the_dense_base(tmp_path):
    """What works today: VeRA on a 4-bit base trains (loss falls), an eval pass in between is
    survived after ``restore_training_layout``, and the adapter file loads onto the dense model
    with the same outputs as the adapter on the dequantized dense base."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, IN))
    quantized = nn.Sequential(
        bnb.nn.Linear4bit(IN, OUT, quant_type="nf4", compute_dtype=torch.float32),
        nn.ReLU(),
        bnb.nn.Linear4bit(OUT, IN, quant_type="nf4", compute_dtype=torch.float32),
    )
    quantized.load_state_dict(dense.state_dict())
    quantized = vt.add_vera(quantized.to("cpu"), "all-linear", r=16, seed=2)
    opt = torch.optim.AdamW([p for p in quantized.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(16, IN), torch.randn(16, IN)
    losses = []
    for step in range(8):
        if step == 4:  # an evaluation pass (it repacks the layers on AVX512-BF16 CPUs)
            quantized.eval()
            with torch.no_grad():
                quantized(x)
            for layer in vt.vera_layers(quantized).values():
                vq.restore_training_layout(layer.base_layer)
            quantized.train()
        opt.zero_grad()
        loss = functional.mse_loss(quantized(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    vt.save_adapter(quantized, tmp_path / "a.safetensors")
    dequantized = nn.Sequential(*(vq.to_dense(m) if vq.quantization(m) else m for m in _bases(quantized)))
    vt.load_adapter(dequantized, tmp_path / "a.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(dequantized(x), quantized(x), rtol=1e-5, atol=1e-5)
    config = vt.load_adapter(dense, tmp_path / "a.safetensors")  # the original dense base takes the same file
    assert sorted(config.layers) == ["0", "2"] and vt.trainable_parameters(dense).trainable == 2 * 16 + OUT + IN


def _bases(model):
    return [m.base_layer if isinstance(m, vt.VeraLinear) else m for m in model]


def test_docs_recipe_runs(tmp_path, monkeypatch, capsys):
    """docs/quantized.md's recipe, as written: a 4-bit model from Hugging Face's BitsAndBytesConfig,
    VeRA trained on it, an evaluation pass, the adapter merged into the 16-bit model."""
    import re
    import tempfile
    from pathlib import Path

    pytest.importorskip("transformers")
    page = (Path(__file__).resolve().parents[2] / "docs" / "quantized.md").read_text()
    (script,) = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its checkpoint goes under tmp_path
    exec(compile(script, "docs/quantized.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "nf4\n" in printed and "loss falls: True" in printed
    difference = float(re.search(r"merged 16-bit one differ by ([\d.]+)", printed).group(1))
    assert 0 < difference < 0.5
