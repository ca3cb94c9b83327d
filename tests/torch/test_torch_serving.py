"""Serving many adapters: per-row choice by names or slot tensor, Hugging Face generate(), bf16 autocast."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="transformers not installed (the torch session has it)")

from torch_helpers import TinyLM, one_adapter_per_row, randomize_vectors  # noqa: E402

import vera_torch as vt  # noqa: E402

NAMES = ["a", "b", "__base__", "c", "a", "d"]


def _gpt2() -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=64, bos_token_id=0, eos_token_id=1, pad_token_id=1
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    vt.add_vera(model, ["c_attn", "c_proj", "c_fc"], r=8, adapter_name="a")
    vt.add_vera(model, ["c_attn", "c_proj", "c_fc"], r=4, adapter_name="b")  # a smaller rank in the same bank
    vt.add_vera(model, ["c_attn", "c_proj", "c_fc"], r=8, adapter_name="c", dvora=True)
    vt.add_vera(model, ["c_attn"], r=8, seed=5, adapter_name="d")  # another pair, fewer layers
    randomize_vectors(model)
    return model


def _tiny() -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM()
    vt.add_vera(model, "all-linear", r=8, adapter_name="a")
    vt.add_vera(model, "all-linear", r=4, adapter_name="b")
    vt.add_vera(model, "all-linear", r=8, adapter_name="c", dvora=True)
    vt.add_vera(model, ["up"], r=8, seed=5, adapter_name="d")
    randomize_vectors(model)
    return model


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_generate_keeps_each_rows_adapter(search: str) -> None:
    """Beam search and several returned sequences expand each input row: every copy keeps its adapter."""
    model = _gpt2()
    ids = torch.randint(2, 50, (len(NAMES), 6), generator=torch.Generator().manual_seed(1))
    options = {"max_new_tokens": 6, "do_sample": False}
    if search == "beam":
        options |= {"num_beams": 3, "num_return_sequences": 2}
    copies = options.get("num_return_sequences", 1)
    with vt.adapter_names(model, NAMES):
        mixed = model.generate(ids, **options)
    for i, name in enumerate(NAMES):
        if name == "__base__":
            with vt.disable_adapters(model):
                alone = model.generate(ids[i : i + 1], **options)
        else:
            vt.set_adapter(model, name)
            alone = model.generate(ids[i : i + 1], **options)
        assert torch.equal(mixed[copies * i : copies * (i + 1)], alone), name


def test_sampling_expands_rows_too() -> None:
    model = _gpt2()
    ids = torch.randint(2, 50, (len(NAMES), 4), generator=torch.Generator().manual_seed(1))
    with vt.adapter_names(model, vt.adapter_index(model, NAMES)):
        out = model.generate(ids, max_new_tokens=3, do_sample=True, num_return_sequences=3)
    assert out.shape == (3 * len(NAMES), 7)


def test_a_slot_tensor_serves_like_names() -> None:
    model = _tiny()
    ids = torch.randint(0, 11, (len(NAMES), 5), generator=torch.Generator().manual_seed(2))
    index = vt.adapter_index(model, NAMES)
    assert index.tolist() == [model.vera_state.slots.slot(n) if n != "__base__" else -1 for n in NAMES]
    torch.testing.assert_close(model(ids, adapter_names=index), model(ids, adapter_names=NAMES), rtol=0, atol=0)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        model(ids, adapter_names=index.float())


@pytest.mark.parametrize("autocast", [False, True])
def test_each_row_equals_that_row_alone(autocast: bool) -> None:
    """fp32 to round-off; under bf16 autocast to bf16 rounding (the two paths round differently)."""
    model = _tiny()
    ids = torch.randint(0, 11, (len(NAMES), 5), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        mixed = model(ids, adapter_names=NAMES)
        alone = one_adapter_per_row(model, ids, NAMES)
    assert mixed.dtype == (torch.bfloat16 if autocast else torch.float32)
    tolerance = {"atol": 0.05, "rtol": 0.02} if autocast else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(mixed.float(), alone.float(), **tolerance)
    if autocast:  # and the bf16 result is as close to the float32 truth as the single-adapter path
        exact = one_adapter_per_row(model, ids, NAMES)
        assert (mixed.float() - exact).norm() <= 2 * (alone.float() - exact).norm()
