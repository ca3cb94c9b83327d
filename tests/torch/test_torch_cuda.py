"""vera_torch on a CUDA GPU: same results as on the CPU, files across devices, no host syncs.

Every test skips, with the reason, on machines without a CUDA device.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch_helpers import TinyLM, one_adapter_per_row, randomize_vectors  # noqa: E402

import vera_torch as vt  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _model(dvora: bool = False, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = TinyLM(d=32, vocab=13)
    vt.add_vera(model, "all-linear", r=8, dvora=dvora, **kwargs)
    randomize_vectors(model)
    return model


def _ids(batch: int = 4, seq: int = 64) -> torch.Tensor:
    return torch.randint(0, 13, (batch, seq), generator=torch.Generator().manual_seed(1))


def _step(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for p in model.parameters():
        p.grad = None
    y = model(ids)
    y.float().square().mean().backward()
    # copies: moving the model to the GPU moves the .grad tensors themselves
    return y, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dvora", [False, True])
@pytest.mark.parametrize("tokens", [8, 256], ids=["factored", "merged-weight"])
def test_training_step_matches_cpu(dvora: bool, tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # full float32 products, as on the CPU
    ids = _ids(batch=1, seq=tokens)
    model = _model(dvora)
    y_cpu, grads_cpu = _step(model, ids)
    y_gpu, grads_gpu = _step(model.cuda(), ids.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    assert grads_gpu.keys() == grads_cpu.keys()
    for name, grad in grads_gpu.items():
        assert grad.device.type == "cuda"
        scale = float(grads_cpu[name].abs().max())  # sums over tokens: compare at the gradient's scale
        torch.testing.assert_close(grad.cpu(), grads_cpu[name], rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("dvora", [False, True])
@pytest.mark.parametrize("tokens", [8, 256], ids=["factored", "merged-weight"])
def test_training_step_does_not_synchronise(dvora: bool, tokens: int) -> None:
    """Forward and backward queue GPU work without waiting for it (no .item(), no host copies)."""
    model = _model(dvora).cuda()
    ids = _ids(batch=1, seq=tokens).cuda()
    _step(model, ids)  # first call: projections, casts and DVoRA's frozen quantities are cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(ids)
        y.float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_adapter_saved_on_gpu_loads_on_cpu(tmp_path) -> None:
    ids = _ids()
    model = _model().cuda()
    expected = model(ids.cuda()).cpu()
    vt.save_adapter(model, tmp_path / "adapter.safetensors")
    torch.manual_seed(0)
    cpu_model = TinyLM(d=32, vocab=13)  # the same base weights, no adapter yet
    vt.load_adapter(cpu_model, tmp_path / "adapter.safetensors", activate=True)
    torch.testing.assert_close(cpu_model(ids), expected, rtol=1e-4, atol=1e-4)


def test_mixed_adapter_batch_on_gpu() -> None:
    torch.manual_seed(0)
    model = TinyLM(d=32, vocab=13)
    vt.add_vera(model, "all-linear", r=8, adapter_name="a")
    vt.add_vera(model, "all-linear", r=5, adapter_name="b")
    randomize_vectors(model)
    model.cuda()
    names = ["a", "b", "__base__", "b"]
    ids = _ids(batch=len(names)).cuda()
    mixed = model(ids, adapter_names=names)
    torch.testing.assert_close(mixed, one_adapter_per_row(model, ids, names), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dvora", [False, True])
def test_merge_and_unmerge_on_gpu(dvora: bool) -> None:
    model = _model(dvora).cuda()
    ids = _ids().cuda()
    with torch.no_grad():
        before = model(ids)
        vt.merge_adapter(model, safe=True)
        merged = model(ids)
        vt.unmerge_adapter(model)
        after = model(ids)
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("dvora", [False, True])
def test_torch_compile_inductor_bf16_on_gpu(dvora: bool) -> None:
    model = _model(dvora).cuda()
    ids = _ids().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(ids)
        compiled = torch.compile(model, fullgraph=True)(ids)
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=0.02, atol=0.02)
    compiled.float().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "vera_lambda" in n)
