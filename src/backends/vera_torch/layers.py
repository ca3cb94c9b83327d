"""``VeraLinear``: a linear-like layer with any number of VeRA / DVoRA adapters.

The wrapper keeps the frozen layer as ``base_layer`` (``nn.Linear``, transformers'
``Conv1D`` or any module whose forward is ``x W^T + b``, quantized ones included) and
holds, per adapter, the trainable vectors ``vera_lambda_d[name]`` (r,),
``vera_lambda_b[name]`` (out,) and, for DVoRA, ``vera_magnitude[name]`` (out,). The
shared projections live once in the model's :class:`~vera_torch.projections.ProjectionStore`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import typing
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional

import vera_core as vc
from vera_torch.functional import dvora, dvora_dense, vera, vera_dense
from vera_torch.projections import ProjectionKey, ProjectionStore

__all__ = ["BASE_ADAPTER", "LayerAdapter", "SharedState", "VeraLinear", "is_conv1d", "layer_dims"]

BASE_ADAPTER = "__base__"
"""In ``adapter_names`` for mixed batches: rows that use no adapter (PEFT's convention)."""

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 style, weight stored (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def layer_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(in_features, out_features, fan_in_fan_out)`` of a linear-like module, or None.

    Examples
    --------
    >>> layer_dims(nn.Linear(3, 5))
    (3, 5, False)
    >>> layer_dims(nn.ReLU()) is None
    True
    """
    if isinstance(module, VeraLinear):
        return module.in_features, module.out_features, module.fan_in_fan_out
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if is_conv1d(module):
        rows, cols = typing.cast(torch.Tensor, module.weight).shape
        return int(rows), int(cols), True
    n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(n_in, int) and isinstance(n_out, int) and not isinstance(module, nn.modules.conv._ConvNd):
        return n_in, n_out, False
    return None


@dataclasses.dataclass
class SharedState:
    """Model-wide adapter state every :class:`VeraLinear` of one model points at."""

    projections: ProjectionStore
    active: list[str] = dataclasses.field(default_factory=list)
    disabled: bool = False
    batch_adapter_names: Sequence[str] | None = None


@dataclasses.dataclass(frozen=True)
class LayerAdapter:
    """One adapter on one layer: method, rank, the shared pair it slices, dropout."""

    method: str
    rank: int
    key: ProjectionKey
    dropout: float = 0.0
    detach_norm: bool = False


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for the adapter's Function (which applies the core's dtype policy itself)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class VeraLinear(nn.Module):
    """A frozen linear-like layer plus VeRA / DVoRA adapters (use :func:`vera_torch.add_vera`).

    Parameters
    ----------
    base_layer : nn.Module
        ``nn.Linear``, transformers ``Conv1D`` or a module computing ``x W^T + b`` with
        integer ``in_features`` / ``out_features`` attributes.
    state : SharedState
        The model's shared state (projections, active adapters).

    Examples
    --------
    >>> import vera_core as vc
    >>> from vera_torch.projections import ProjectionStore, ProjectionKey
    >>> store = ProjectionStore()
    >>> key = store.add(ProjectionKey(vc.PRNG_ID, 0, 4, 8, 6))
    >>> layer = VeraLinear(nn.Linear(8, 6), SharedState(store, active=["a"]))
    >>> layer.add_adapter("a", LayerAdapter("vera", 4, key), d_initial=0.1)
    >>> x = torch.randn(2, 8)
    >>> torch.equal(layer(x), layer.base_layer(x))  # lambda_b starts at zero
    True
    """

    _state: SharedState  # set with object.__setattr__: shared by the model's layers, not a submodule

    def __init__(self, base_layer: nn.Module, state: SharedState) -> None:
        super().__init__()
        dims = layer_dims(base_layer)
        if dims is None or isinstance(base_layer, VeraLinear):
            raise TypeError(
                f"{type(base_layer).__name__} is not a linear-like layer: expected nn.Linear, transformers Conv1D "
                "or a module with integer in_features/out_features computing x W^T + b"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = dims
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_magnitude = nn.ParameterDict()
        self.adapters: dict[str, LayerAdapter] = {}
        self.merged_adapters: list[str] = []
        self._merge_norms: dict[str, torch.Tensor] = {}
        self._frozen_cache: dict[str, tuple[Any, vc.DvoraFrozen]] = {}
        object.__setattr__(self, "_state", state)  # shared, not a submodule

    # ------------------------------------------------------------------ adapters
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (what transformers code that inspects ``.weight`` expects)."""
        return typing.cast(torch.Tensor, self.base_layer.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias, or None."""
        return getattr(self.base_layer, "bias", None)

    def _dense_weight(self, purpose: str) -> torch.Tensor:
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
            raise TypeError(
                f"{purpose} needs the base layer's dense floating-point weight, but "
                f"{type(self.base_layer).__name__} has {type(weight).__name__} "
                f"{getattr(weight, 'dtype', '')}; VeRA's forward works on such layers, {purpose} does not"
            )
        return weight

    def vector_dtype(self) -> torch.dtype:
        """float32, or the base weight's dtype when that is float32 or wider."""
        weight = getattr(self.base_layer, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.element_size() >= 4:
            return weight.dtype
        return torch.float32

    def _device(self) -> torch.device:
        for tensor in (*self.base_layer.parameters(), *self.base_layer.buffers()):
            return tensor.device
        return torch.device("cpu")

    def add_adapter(
        self,
        name: str,
        spec: LayerAdapter,
        *,
        d_initial: float = 0.1,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Attach adapter ``name`` (vectors initialised, or copied from ``tensors``)."""
        if not _NAME.match(name) or name == BASE_ADAPTER:
            raise ValueError(f"adapter name must be a Python identifier other than {BASE_ADAPTER!r}, got {name!r}")
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        if not spec.key.covers(spec.rank, self.in_features, self.out_features):
            raise ValueError(
                f"a layer of {self.in_features} inputs, {self.out_features} outputs and rank {spec.rank} does not fit "
                f"the shared projections (r={spec.key.r}, max_in={spec.key.max_in}, max_out={spec.key.max_out})"
            )
        if spec.method not in ("vera", "dvora"):
            raise ValueError(f"method must be 'vera' or 'dvora', got {spec.method!r}")
        device, dtype = self._device(), self.vector_dtype()
        if spec.method == "dvora":
            weight = self._dense_weight("DVoRA")
        tensors = tensors or {}
        lambda_d = tensors.get("lambda_d", torch.full((spec.rank,), float(d_initial)))
        lambda_b = tensors.get("lambda_b", torch.zeros(self.out_features))
        self.vera_lambda_d[name] = nn.Parameter(lambda_d.detach().to(device=device, dtype=dtype).clone())
        self.vera_lambda_b[name] = nn.Parameter(lambda_b.detach().to(device=device, dtype=dtype).clone())
        if spec.method == "dvora":
            magnitude = tensors.get("magnitude")
            if magnitude is None:
                magnitude = vc.initial_magnitude(weight, fan_in_fan_out=self.fan_in_fan_out, dtype=dtype)
            self.vera_magnitude[name] = nn.Parameter(magnitude.detach().to(device=device, dtype=dtype).clone())
        self.adapters[name] = spec

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (it must not be merged)."""
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the weight; unmerge it before deleting it")
        self.adapters.pop(name)
        for store in (self.vera_lambda_d, self.vera_lambda_b, self.vera_magnitude):
            if name in store:
                del store[name]
        self._frozen_cache.pop(name, None)

    # ------------------------------------------------------------------ pieces
    def _vectors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vera_lambda_d[name], self.vera_lambda_b[name]

    def _projections(self, name: str, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` as ``dtype`` (it multiplies the activations) and ``B`` as the vectors (it is only folded with them)."""
        store, key, vectors = self._state.projections, self.adapters[name].key, self.vera_lambda_b[name]
        A, B = store.get(key, dtype, vectors.device)
        if B.dtype != vectors.dtype:
            B = store.get(key, vectors.dtype, vectors.device)[1]
        return A, B

    def _frozen(self, name: str, weight: torch.Tensor) -> vc.DvoraFrozen:
        spec = self.adapters[name]
        stamp = (weight._version, weight.device, weight.dtype, weight.data_ptr())
        cached = self._frozen_cache.get(name)
        if cached is not None and (torch.compiler.is_compiling() or cached[0] == stamp):
            return cached[1]
        A, _ = self._projections(name)
        frozen = vc.dvora_precompute(weight.detach(), A, spec.rank, fan_in_fan_out=self.fan_in_fan_out)
        if not torch.compiler.is_compiling():
            self._frozen_cache[name] = (stamp, frozen)
        return frozen

    def _dropout_mask(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        p = self.adapters[name].dropout
        if p == 0.0 or not self.training:
            return None
        return torch.empty_like(x).bernoulli_(1.0 - p) / (1.0 - p)

    def _base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._dense_weight("DVoRA")
        w = weight.to(x.dtype)
        return x @ w if self.fan_in_fan_out else functional.linear(x, w)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base output plus every active, unmerged adapter (or per-row adapters in a mixed batch)."""
        state = self._state
        if state.disabled:
            return self.base_layer(x, *args, **kwargs)
        if state.batch_adapter_names is not None:
            return self._mixed_forward(x, state.batch_adapter_names, *args, **kwargs)
        pending = [n for n in state.active if n in self.adapters and n not in self.merged_adapters]
        if not pending:
            return self.base_layer(x, *args, **kwargs)
        dtype = _compute_dtype(x)
        dvora_names = [n for n in pending if self.adapters[n].method == "dvora"]
        if len(dvora_names) > 1:
            raise RuntimeError(f"at most one DVoRA adapter can be active on a layer, got {dvora_names}")
        if dvora_names and self.merged_adapters:
            raise RuntimeError("a DVoRA adapter cannot run on top of merged adapters; unmerge them first")
        vera_names = [n for n in pending if self.adapters[n].method == "vera"]
        xc = x.to(dtype)
        if not dvora_names and not args and not kwargs and len(vera_names) == 1:
            dense = self._dense_forward(vera_names[0], xc)
            if dense is not None:
                return dense
        if dvora_names:
            result = self._dvora_forward(dvora_names[0], x, dtype)
        else:
            result = self.base_layer(x, *args, **kwargs)
        if not vera_names:
            return result
        result = result.to(dtype)
        with _no_autocast(x):
            for name in vera_names:
                A, B = self._projections(name, dtype)
                lambda_d, lambda_b = self._vectors(name)
                result = vera(result, xc, A, B, lambda_d, lambda_b, self._dropout_mask(name, xc))
        return result

    def _merged_weight_pays(self, name: str, x: torch.Tensor, weight: Any) -> bool:
        """Whether the merged-weight formulation applies to ``weight`` and needs fewer multiply-adds.

        It applies with a frozen floating weight of the activations' dtype (or any floating
        weight under autocast, which casts it anyway) and no dropout in effect. With 16-bit
        activations ``W0 + dW`` is rounded to 16 bits once, as the factored output is.
        """
        dropout = self.training and self.adapters[name].dropout > 0.0
        if dropout or not isinstance(weight, torch.Tensor) or weight.requires_grad or not weight.is_floating_point():
            return False
        if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            return False
        tokens = x.numel() // max(x.shape[-1], 1)
        rank = self.adapters[name].rank
        return vc.dense_is_cheaper(tokens, self.in_features, self.out_features, rank, backward=torch.is_grad_enabled())

    def _dense_forward(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The merged-weight VeRA path, or None where it does not apply or costs more.

        Besides :meth:`_merged_weight_pays`, it replaces the base layer's own forward, so it
        needs a plain ``nn.Linear`` or transformers ``Conv1D`` base with a frozen bias.
        """
        base = self.base_layer
        plain = type(base) is nn.Linear or (
            type(base).__name__ == "Conv1D" and type(base).__module__.startswith("transformers")
        )
        if not plain:
            return None
        weight, bias = typing.cast(torch.Tensor, base.weight), typing.cast(torch.Tensor | None, base.bias)
        if (bias is not None and bias.requires_grad) or not self._merged_weight_pays(name, x, weight):
            return None
        A, B = self._projections(name, x.dtype)
        lambda_d, lambda_b = self._vectors(name)
        with _no_autocast(x):
            return vera_dense(x, weight, bias, A, B, lambda_d, lambda_b, fan_in_fan_out=self.fan_in_fan_out)

    def _dvora_forward(self, name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        weight = self._dense_weight("DVoRA")
        frozen = self._frozen(name, weight)
        xc = x.to(dtype)
        with _no_autocast(x):
            A, B = self._projections(name, dtype)
            lambda_d, lambda_b = self._vectors(name)
            bias = self.bias
            if self._merged_weight_pays(name, xc, weight):
                return dvora_dense(
                    xc,
                    weight,
                    bias,
                    frozen,
                    A,
                    B,
                    self.vera_magnitude[name],
                    lambda_d,
                    lambda_b,
                    fan_in_fan_out=self.fan_in_fan_out,
                    detach_norm=self.adapters[name].detach_norm,
                )
            return dvora(
                self._base_without_bias(xc),
                xc,
                frozen,
                A,
                B,
                self.vera_magnitude[name],
                lambda_d,
                lambda_b,
                bias,
                self._dropout_mask(name, xc),
                detach_norm=self.adapters[name].detach_norm,
            )

    def _mixed_forward(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each batch row uses its own adapter: one gather of vectors per shared pair, no loop over adapters.

        Rows of DVoRA adapters are then scaled by their ``m / n`` (gathered too) and get the bias
        after it; rows of VeRA adapters, and rows of none, by one.
        """
        if x.dim() < 2 or len(names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(names)} entries but the batch has {x.shape[0] if x.dim() else 0} rows; "
                "give one adapter name (or '__base__') per row"
            )
        if self.merged_adapters:
            raise RuntimeError("mixed-adapter batches need unmerged adapters; unmerge first")
        used = sorted({n for n in names if n != BASE_ADAPTER and n in self.adapters})
        if not used:
            return self.base_layer(x, *args, **kwargs)
        dtype = _compute_dtype(x)
        xc = x.to(dtype)
        dvora_used = [n for n in used if self.adapters[n].method == "dvora"]
        # DVoRA rows scale x W0^T + dW and add the bias after: the sum starts without it
        result = self._base_without_bias(xc) if dvora_used else self.base_layer(x, *args, **kwargs).to(dtype)
        groups: dict[ProjectionKey, list[str]] = {}
        for name in used:
            groups.setdefault(self.adapters[name].key, []).append(name)
        with _no_autocast(x):
            for key, group in groups.items():  # one pass per shared pair (normally exactly one)
                result = result + self._mixed_delta(xc, names, key, group, dtype)
            if dvora_used:
                magnitude_rows, norm_rows = self._mixed_scales(names, dvora_used, x.device)
                return vc.dvora_rows_output(result, magnitude_rows, norm_rows, bias=self.bias)
        return result

    def _mixed_scales(
        self, names: Sequence[str], dvora_used: list[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the magnitude and the norm of its DVoRA adapter (ones for every other row)."""
        weight = self._dense_weight("DVoRA")
        ones = torch.ones(self.out_features, dtype=self.vera_magnitude[dvora_used[0]].dtype, device=device)
        magnitudes, norms = [ones], [ones]
        for name in dvora_used:
            _, B = self._projections(name)
            norm = vc.dvora_norm(self._frozen(name, weight), B, *self._vectors(name))
            norms.append(norm.detach() if self.adapters[name].detach_norm else norm)
            magnitudes.append(self.vera_magnitude[name])
        position = {n: i for i, n in enumerate(dvora_used, start=1)}
        index = torch.tensor([position.get(n, 0) for n in names], device=device)
        return torch.stack(magnitudes)[index], torch.stack(norms)[index]

    def _mixed_delta(
        self, x: torch.Tensor, names: Sequence[str], key: ProjectionKey, group: list[str], dtype: torch.dtype
    ) -> torch.Tensor:
        rank = max(self.adapters[n].rank for n in group)
        A, B = self._state.projections.get(key, dtype, x.device)
        vec_dtype = self.vera_lambda_b[group[0]].dtype
        # row 0: rows not in this group (zero vectors); lambda_d zero-padded to the group's largest rank (exact)
        table_d = torch.stack(
            [torch.zeros(rank, dtype=vec_dtype, device=x.device)]
            + [functional.pad(self.vera_lambda_d[n], (0, rank - self.adapters[n].rank)) for n in group]
        )
        table_b = torch.stack(
            [torch.zeros(self.out_features, dtype=vec_dtype, device=x.device)] + [self.vera_lambda_b[n] for n in group]
        )
        position = {n: i for i, n in enumerate(group, start=1)}
        index = torch.tensor([position.get(n, 0) for n in names], device=x.device)
        return vc.vera_delta_rows(x, A, B, table_d[index].to(dtype), table_b[index].to(dtype))

    # ------------------------------------------------------------------ merging
    def merge(self, names: Sequence[str], *, safe: bool = False) -> None:
        """Fold adapters into the base weight (all checked before the weight is touched)."""
        weight = self._dense_weight("merging")
        todo = [n for n in names if n in self.adapters and n not in self.merged_adapters]
        if any(self.adapters[n].method == "dvora" for n in todo) and (len(todo) > 1 or self.merged_adapters):
            raise RuntimeError("a DVoRA adapter must be merged alone, onto an unmerged weight")
        new = weight.detach()
        norms: dict[str, torch.Tensor] = {}
        for name in todo:
            A, B = self._projections(name)
            lambda_d, lambda_b = (v.detach() for v in self._vectors(name))
            if self.adapters[name].method == "dvora":
                magnitude = self.vera_magnitude[name].detach()
                new, norms[name] = vc.dvora_merge(
                    new, A, B, magnitude, lambda_d, lambda_b, fan_in_fan_out=self.fan_in_fan_out, safe=safe
                )
            else:
                new = vc.merge(new, A, B, lambda_d, lambda_b, fan_in_fan_out=self.fan_in_fan_out, safe=safe)
        with torch.no_grad():
            weight.copy_(new)
        self._merge_norms.update(norms)
        self.merged_adapters.extend(todo)

    def unmerge(self) -> None:
        """Undo every merge, newest first (up to rounding)."""
        if not self.merged_adapters:
            return
        weight = self._dense_weight("unmerging")
        new = weight.detach()
        for name in reversed(self.merged_adapters):
            A, B = self._projections(name)
            lambda_d, lambda_b = (v.detach() for v in self._vectors(name))
            if self.adapters[name].method == "dvora":
                new = vc.dvora_unmerge(
                    new,
                    self._merge_norms[name],
                    A,
                    B,
                    self.vera_magnitude[name].detach(),
                    lambda_d,
                    lambda_b,
                    fan_in_fan_out=self.fan_in_fan_out,
                )
            else:
                new = vc.unmerge(new, A, B, lambda_d, lambda_b, fan_in_fan_out=self.fan_in_fan_out)
        with torch.no_grad():
            weight.copy_(new)
        self.merged_adapters.clear()
        self._merge_norms.clear()

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {s.method} r={s.rank}" for n, s in self.adapters.items())
