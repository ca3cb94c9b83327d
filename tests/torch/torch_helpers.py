"""Small models and references shared by the torch backend tests."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")  # also skips --doctest-modules collection without torch

from torch import nn  # noqa: E402


class Conv1D(nn.Module):
    """transformers' GPT-2 ``Conv1D`` layout (weight (in, out)), without importing transformers."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class Int8Linear(nn.Module):
    """A quantized linear-like layer: int8 weight buffer and scales, no ``weight`` parameter."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(linear.weight.detach() / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.qweight.to(x.dtype) * self.scale.to(x.dtype), self.bias.to(x.dtype))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.v_proj(torch.tanh(self.q_proj(x)))
        return h + self.down(torch.relu(self.up(h)))


class TinyLM(nn.Module):
    """Embedding, two blocks and an ``lm_head`` (excluded by "all-linear")."""

    def __init__(self, d: int = 16, vocab: int = 11, n_layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d) for _ in range(n_layers)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def randomize_vectors(model: nn.Module, seed: int = 0) -> None:
    """Give every adapter's vectors random values (lambda_b starts at zero, which hides bugs).

    Only the rows the adapters own, within their ranks: free rows and zero padding stay zero.
    """
    import vera_torch as vt

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in vt.vera_layers(model).values():
            for name in layer.adapter_names():
                for kind, vector in layer.vectors(name).items():
                    values = torch.randn(vector.shape, generator=generator, dtype=torch.float32) * 0.5
                    if kind == "magnitude":
                        values = values.abs() + 0.5
                    vector.copy_(values.to(vector.dtype))


def vector_grads(model: nn.Module) -> dict[tuple[str, str, str], torch.Tensor]:
    """Every adapter's gradient per (layer path, adapter, kind), dense (None rows omitted).

    Reads the bank parameters' gradients (dense, or sparse past one row) at each adapter's row.
    """
    import vera_torch as vt

    found = {}
    for path, layer in vt.vera_layers(model).items():
        for name in layer.adapter_names():
            bank, slot = layer.find(name)
            for kind, param in bank.parameters_by_kind().items():
                if kind not in layer.vectors(name) or param.grad is None:
                    continue
                grad = param.grad.to_dense() if param.grad.is_sparse else param.grad
                row = grad[slot]
                found[path, name, kind] = row[: layer.rank_of(name)] if kind == "lambda_d" else row
    return found


def vector_params(model: nn.Module) -> list[torch.Tensor]:
    """The bank parameters of every adapted layer (what autograd differentiates with respect to)."""
    import vera_torch as vt

    return [
        p for layer in vt.vera_layers(model).values() for b in layer.banks() for p in b.parameters_by_kind().values()
    ]


def one_adapter_per_row(model: nn.Module, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The reference for a mixed-adapter batch: each row run alone with its adapter (or none)."""
    import vera_torch as vt

    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with vt.disable_adapters(model):
                rows.append(model(ids[i : i + 1]))
        else:
            vt.set_adapter(model, name)
            rows.append(model(ids[i : i + 1]))
    return torch.cat(rows)


def read_tensors(path: Any) -> tuple[Any, dict[str, Any]]:
    """The config and every tensor (projections included when stored) of a verified adapter file."""
    from vera_core.loading import read_adapter

    adapter = read_adapter(path)
    return adapter.config, adapter.tensors()
