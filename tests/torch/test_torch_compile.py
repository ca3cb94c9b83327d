"""``torch.compile(fullgraph=True)`` of adapted Hugging Face models, against eager, on the CPU.

Tiny ``LlamaForCausalLM`` and ``GPT2LMHeadModel`` (GPT-2's ``Conv1D`` layers: fan_in_fan_out)
built from configs, every linear layer but the head adapted with VeRA or DVoRA. With
``fullgraph=True`` any graph break raises, so these tests pass only when Dynamo traces the
whole model, adapters included, into one graph. Compiled (inductor) and eager copies of one
model train side by side: the loss, every adapter gradient and the parameters after AdamW
steps must agree, and steps after the first must reuse the compiled graph (no recompilation).
Inference (``eval()``, ``no_grad``) is compared the same way.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the compiled models are Hugging Face transformers models")

from torch import nn  # noqa: E402
from torch_helpers import randomize_vectors  # noqa: E402

import vera_core as vc  # noqa: E402
import vera_torch as vt  # noqa: E402

VOCAB = 64
pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")


def _hf_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            use_cache=False,
        )
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=1,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    model = transformers.GPT2LMHeadModel(config)
    # transformers finds no loss type in the class name "GPT2LMHeadModel" and logs (warning_once)
    # that it falls back to the causal-LM loss on every call: a logging call in the compiled
    # forward, i.e. a graph break that is transformers', not the adapters'
    model.loss_type = "ForCausalLM"
    return model


def _adapted(arch: str, dvora: bool) -> nn.Module:
    model = _hf_model(arch)
    vt.add_vera(model, target_modules="all-linear", r=8, dvora=dvora)
    randomize_vectors(model)  # lambda_b starts at zero, which would hide a wrong adapter path
    return model


def _ids(batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max()) or 1.0  # gradients sum over tokens: compare at their scale
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (the models share transformers' code objects)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


TRAINING_CASES = [
    *[(arch, dvora, None) for arch in ("llama", "gpt2") for dvora in (False, True)],
    # each pass of the whole-layer node forced one way (16 tokens pick a merged backward, a factored forward)
    *[("llama", dvora, passes) for dvora in (False, True) for passes in ((True, True), (False, False))],
]


@pytest.mark.parametrize(
    ("arch", "dvora", "passes"),
    TRAINING_CASES,
    ids=[
        f"{a}-{'dvora' if d else 'vera'}-{'by-cost' if p is None else 'merged' if p[0] else 'factored'}"
        for a, d, p in TRAINING_CASES
    ],
)
def test_compiled_training_matches_eager(
    arch: str, dvora: bool, passes: tuple[bool, bool] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if passes is not None:
        monkeypatch.setattr(vc, "merged_passes", lambda *args, **kwargs: vc.MergedPasses(*passes))
    eager, twin = _adapted(arch, dvora), _adapted(arch, dvora)
    for (name, p), q in zip(eager.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"the two copies differ at {name} before training"
    eager.train()
    twin.train()
    compiled = torch.compile(twin, fullgraph=True)  # a graph break raises here
    params, twin_params = _trainable(eager), _trainable(twin)
    assert params.keys() == twin_params.keys() and len(params) > 0
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    twin_optimizer = torch.optim.AdamW(twin_params.values(), lr=1e-2)
    ids = _ids()
    losses = []
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        twin_optimizer.zero_grad(set_to_none=True)
        loss = eager(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            twin_loss = compiled(input_ids=ids, labels=ids).loss  # compiles
        else:  # the graph from the first step serves every later one
            with torch._dynamo.config.patch(error_on_recompile=True):
                twin_loss = compiled(input_ids=ids, labels=ids).loss
        twin_loss.backward()
        losses.append(loss.item())
        _close(twin_loss.detach(), loss.detach(), f"loss at step {step}")
        for name, p in params.items():
            grad = twin_params[name].grad
            assert grad is not None, f"{name}: no gradient through the compiled model at step {step}"
            _close(grad, p.grad, f"gradient of {name} at step {step}")
        optimizer.step()
        twin_optimizer.step()
    for name, p in params.items():
        _close(twin_params[name].detach(), p.detach(), f"{name} after three AdamW steps")
    assert losses[-1] < losses[0], f"the loss did not fall: {losses}"


@pytest.mark.parametrize("dvora", [False, True], ids=["vera", "dvora"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compiled_inference_matches_eager(arch: str, dvora: bool) -> None:
    model = _adapted(arch, dvora).eval()
    ids = _ids(batch=3, seq=12)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        actual = compiled(input_ids=ids).logits
        with vt.disable_adapters(model):
            bare = model(input_ids=ids).logits
    assert not torch.allclose(expected, bare, atol=1e-3), "the adapter changes nothing: the comparison would be empty"
    _close(actual, expected, "logits")
