"""VeRA adapters both ways between vera_torch and Hugging Face PEFT, on models built from configs.

Nothing is downloaded: tiny GPT-2 (Conv1D layers, fan_in_fan_out) and Llama (nn.Linear,
grouped-query attention so the layers differ in shape) are built from their configs.
"""

import copy
import json

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import vera_torch as vt  # noqa: E402
from vera_core.adapter_file import AdapterFileError  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=50)
    return transformers.GPT2LMHeadModel(config).eval(), ["c_attn", "c_proj", "c_fc"]


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(config).eval(), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]


MODELS = {"gpt2-conv1d": _gpt2, "llama-linear": _llama}


def _ids():
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _randomize(model, seed=0):
    """Random vectors for a PEFT model's ``vera_lambda_*`` parameters or a vera_torch model's bank rows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if hasattr(model, "vera_state"):
            for layer in vt.vera_layers(model).values():
                for name in layer.adapter_names():
                    for vector in layer.vectors(name).values():
                        vector.copy_(torch.randn(vector.shape, generator=g) * 0.5)
            return
        for name, param in model.named_parameters():
            if "vera_lambda" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_peft_folder_loads_into_vera_torch(tmp_path, arch, save_projection):
    base, targets = MODELS[arch]()
    ours = copy.deepcopy(base)
    config = peft.VeraConfig(
        r=8,
        target_modules=targets,
        projection_prng_key=5,
        save_projection=save_projection,
        fan_in_fan_out=arch.startswith("gpt2"),
    )
    peft_model = peft.get_peft_model(base, config)
    _randomize(peft_model)
    peft_model.save_pretrained(tmp_path)
    want = _logits(peft_model)

    loaded = vt.load_peft_adapter(ours, tmp_path)
    assert loaded.prng_id == "torch-mt19937-peft"
    assert all(spec.in_features for spec in loaded.layers.values())
    ours.eval()
    torch.testing.assert_close(_logits(ours), want, **TOL)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_vera_torch_adapter_loads_into_peft(tmp_path, arch):
    base, targets = MODELS[arch]()
    fresh = copy.deepcopy(base)
    ours = vt.add_vera(base, target_modules=targets, r=8, seed=11)
    _randomize(ours, seed=3)
    want = _logits(ours)
    vt.save_peft_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is True
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(_logits(peft_model), want, **TOL)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_smaller_rank_exports_padded(tmp_path):
    base, targets = _llama()
    fresh = copy.deepcopy(base)
    ours = vt.add_vera(base, target_modules=targets, r=8, adapter_name="big")
    vt.add_vera(ours, target_modules=targets, r=3, adapter_name="small")
    vt.set_adapter(ours, "small")
    _randomize(ours, seed=4)
    want = _logits(ours)
    vt.save_peft_adapter(ours, tmp_path, "small")
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(_logits(peft_model), want, **TOL)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_round_trip_peft_to_ours_to_peft(tmp_path):
    base, targets = _gpt2()
    ours, fresh = copy.deepcopy(base), copy.deepcopy(base)
    peft_model = peft.get_peft_model(base, peft.VeraConfig(r=4, target_modules=targets, fan_in_fan_out=True))
    _randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    vt.load_peft_adapter(ours, tmp_path / "peft")
    vt.save_peft_adapter(ours, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(fresh, tmp_path / "again").eval()
    torch.testing.assert_close(_logits(again), _logits(peft_model), **TOL)


def test_dvora_cannot_be_exported_and_mismatch_is_refused(tmp_path):
    base, targets = _llama()
    other = copy.deepcopy(base)
    ours = vt.add_vera(base, target_modules=targets, r=4, dvora=True)
    with pytest.raises(AdapterFileError, match="PEFT has no DVORA"):
        vt.save_peft_adapter(ours, tmp_path / "d")
    gpt, gpt_targets = _gpt2()
    peft.get_peft_model(gpt, peft.VeraConfig(r=4, target_modules=gpt_targets, fan_in_fan_out=True)).save_pretrained(
        tmp_path / "g"
    )
    with pytest.raises(AdapterFileError, match="does not fit this model"):
        vt.load_peft_adapter(other, tmp_path / "g")
    assert not vt.vera_layers(other)


def test_peft_recipe_is_bit_identical():
    from peft.tuners.vera.model import _kaiming_init

    generator = torch.Generator(device="cpu").manual_seed(17)
    want_A = _kaiming_init((8, 40), generator=generator)
    want_B = _kaiming_init((24, 8), generator=generator)
    A, B = vt.peft_projections(17, 8, 40, 24)
    assert torch.equal(A, want_A) and torch.equal(B, want_B)


def test_bias_all_moves_every_trained_bias_both_ways(tmp_path):
    """PEFT's bias='all' trains and saves every bias (GPT-2's layer norms too); nothing may be dropped."""
    model, targets = _gpt2()
    peft_model = peft.get_peft_model(
        copy.deepcopy(model), peft.VeraConfig(r=8, target_modules=targets, bias="all", save_projection=True)
    )
    _randomize(peft_model)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if name.endswith("bias"):
                param.add_(0.25)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(model)
    config = vt.load_peft_adapter(ours, tmp_path / "peft", activate=True)
    assert config.bias_modules  # biases outside the adapted layers (layer norms) came along
    torch.testing.assert_close(_logits(ours), _logits(peft_model), **TOL)

    vt.save_peft_adapter(ours, tmp_path / "back")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "back").eval()
    torch.testing.assert_close(_logits(reloaded), _logits(peft_model), **TOL)


@pytest.mark.parametrize("arch", ["tiny", "llama-linear"])
def test_a_second_adapter_on_fewer_layers_exports_for_peft(tmp_path, arch):
    """PEFT sizes A and B from the adapter's own layers: the export stores those leading blocks."""
    if arch == "tiny":
        torch.manual_seed(0)
        base, first, subset = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 16)), ["0", "1"], ["0"]
        x = torch.randn(3, 8)
        run = lambda m: m(x)  # noqa: E731
    else:
        base, first = _llama()
        subset = ["q_proj"]
        run = _logits
    ours = vt.add_vera(copy.deepcopy(base), first, r=4, seed=0)
    vt.add_vera(ours, subset, r=4, seed=0, adapter_name="small")
    _randomize(ours, seed=5)
    vt.set_adapter(ours, "small")
    vt.save_peft_adapter(ours, tmp_path, adapter_name="small")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(run(loaded), run(ours), **TOL)
