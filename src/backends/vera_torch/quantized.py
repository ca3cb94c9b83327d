"""Quantized base layers: bitsandbytes ``Linear4bit`` (nf4, fp4) and ``Linear8bitLt`` (int8).

The primitives the adapters need on such a base, none of which builds more than one dense
weight at a time:

- :func:`quantization` tells a quantized layer (``"nf4"``, ``"fp4"``, ``"int8"``) from others;
- :func:`dequantize` returns the dense float32 weight (out, in) the layer's training
  forward multiplies by, and its bias, without changing the layer;
- :func:`requantize` stores a new dense weight in the layer with the same quantization
  settings and returns the largest error that added;
- :func:`to_dense` builds the ``nn.Linear`` that computes what the layer computes;
- :func:`base_without_bias` is the layer's own forward less its bias (DVoRA's ``x W0^T``);
- :func:`state_stamp` changes whenever the quantized state does (a cache key);
- :func:`restore_training_layout` undoes bitsandbytes' CPU inference repacking.

bitsandbytes is imported only when a layer of its own is passed: ``vera_torch`` imports
and works without it.

CPU repacking: on a CPU with AVX512-BF16, a 4-bit layer's first forward in eval mode without
gradients (bitsandbytes >= 0.48) repacks its weight for a bfloat16 kernel: the block
scales become bfloat16 (its effective weight changes slightly), the output is computed in
bfloat16, and the layer can no longer train (its forward then has no gradient).
:func:`dequantize` reads either layout; :func:`restore_training_layout` returns a repacked
layer to the trainable layout without changing its effective weight again.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "QUANTIZATIONS",
    "DenseParts",
    "base_without_bias",
    "dequantize",
    "quantization",
    "requantize",
    "restore_training_layout",
    "state_stamp",
    "to_dense",
]

QUANTIZATIONS = ("nf4", "fp4", "int8")
"""What :func:`quantization` can answer besides None."""


class DenseParts(NamedTuple):
    """A quantized layer's weight and bias as dense float32 tensors (fresh copies)."""

    weight: torch.Tensor
    """(out_features, in_features)."""
    bias: torch.Tensor | None
    """(out_features,), or None."""


def _bnb() -> Any:
    """The bitsandbytes module, when it has been imported (a layer of its own exists only then)."""
    return sys.modules.get("bitsandbytes")


def quantization(module: nn.Module) -> str | None:
    """``"nf4"``/``"fp4"`` (``Linear4bit``), ``"int8"`` (``Linear8bitLt`` holding int8 weights) or None.

    ``Linear8bitLt`` with ``has_fp16_weights=True`` keeps a float weight: None.

    Examples
    --------
    >>> quantization(nn.Linear(4, 2)) is None
    True
    """
    layer: Any = module
    bnb = _bnb()
    if bnb is None:
        return None
    if isinstance(layer, bnb.nn.Linear4bit):
        state = getattr(layer.weight, "quant_state", None)
        return getattr(state, "quant_type", None) or getattr(layer.weight, "quant_type", None)
    if isinstance(layer, bnb.nn.Linear8bitLt) and not layer.state.has_fp16_weights:
        return "int8"
    return None


def _check(module: Any) -> str:
    kind = quantization(module)
    if kind is None:
        raise TypeError(
            f"{type(module).__name__} is not a quantized layer this module knows: expected bitsandbytes Linear4bit "
            "(nf4/fp4) or Linear8bitLt with has_fp16_weights=False"
        )
    if kind in ("nf4", "fp4") and getattr(module.weight, "quant_state", None) is None:
        raise ValueError(
            f"this {type(module).__name__} holds no quantized weight yet: bitsandbytes quantizes when the layer is "
            "moved to a device (layer.to('cpu') or .cuda())"
        )
    if kind == "int8" and module.weight.dtype != torch.int8:
        raise ValueError("this Linear8bitLt holds no int8 weight yet: move it to a device to quantize it")
    return kind


def _is_repacked(state: Any) -> bool:
    return bool(getattr(state, "packing_format_for_cpu", False))


def _four_bit_codes(module: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The packed 4-bit codes in bitsandbytes' standard layout, the float32 block scales, the state."""
    bnb = _bnb()
    weight = module.weight
    state = weight.quant_state
    if _is_repacked(state):
        scratch = copy.copy(state)  # the inverse edits the state it is given; never the layer's
        scratch.original_nested = False  # skip its re-nesting of the scales: the layer's own are read below
        codes, _ = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, scratch)
        out_features, in_features = state.shape
        absmax = state.absmax.reshape(in_features // state.blocksize, out_features).T.reshape(-1)
        return codes, absmax.float(), state
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return weight.data, absmax.float(), state


def _int8_parts(module: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, row scales): before the first forward they sit on the weight, after it on ``state``."""
    scales = module.state.SCB if module.state.SCB is not None else module.weight.SCB
    return module.weight.data, scales


def dequantize(module: nn.Module) -> DenseParts:
    """The dense float32 weight (out, in) and bias the quantized ``module`` computes with.

    4-bit: the codes times their block scales, in float32, as bitsandbytes' training forward
    dequantizes them (a repacked CPU layer: its bfloat16 scales). 8-bit: each int8 row times
    its scale / 127, as the training forward on the CPU does (on CUDA, bitsandbytes' 8-bit
    forward also rounds the activations to int8). The layer is not changed. Checked against
    bitsandbytes 0.50.2 on the CPU.

    Raises
    ------
    TypeError
        ``module`` is not a known quantized layer.
    ValueError
        It has not been quantized yet.

    Examples
    --------
    >>> try:
    ...     dequantize(nn.Linear(4, 2))
    ... except TypeError as error:
    ...     print(str(error).split(":")[0])
    Linear is not a quantized layer this module knows
    """
    layer: Any = module
    kind = _check(layer)
    with torch.no_grad():
        if kind == "int8":
            codes, scales = _int8_parts(layer)
            weight = codes.float() * (scales.float() * (1.0 / 127.0)).unsqueeze(1)
        else:
            codes, absmax, state = _four_bit_codes(layer)
            weight = torch.ops.bitsandbytes.dequantize_4bit.default(
                codes, absmax, state.blocksize, state.quant_type, state.shape, torch.float32
            )
        bias = layer.bias.detach().float().clone() if layer.bias is not None else None
    return DenseParts(weight, bias)


def requantize(module: nn.Module, weight: torch.Tensor) -> float:
    """Store the dense ``weight`` (out, in) in the quantized ``module``; return the max abs error added.

    The new weight is quantized by bitsandbytes with the layer's settings (4-bit: quant
    type, block size, nested statistics, storage dtype, from the dtype the layer was first
    quantized from; 8-bit: int8 rows with fp16-derived scales, as ``Linear8bitLt`` does).
    The error returned is ``max |dequantize(module).weight - weight|`` afterwards. Everything
    is checked and the new weight built before the layer changes; on an error it is
    unchanged. A repacked CPU layer comes back in the trainable layout (bitsandbytes repacks
    it at its next eval forward, rounding its scales to bfloat16 once more).

    Raises
    ------
    TypeError, ValueError
        Not a known quantized layer; ``weight`` of the wrong shape or not finite.
    """
    layer: Any = module
    kind = _check(layer)
    bnb = _bnb()
    expected = (layer.out_features, layer.in_features)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or tuple(weight.shape) != expected:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"requantize needs a floating-point weight of shape {expected} (out, in), got {got}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("requantize got a weight with NaN or infinite entries; the layer is unchanged")
    old = layer.weight
    device = old.device
    dense = weight.detach().to("cpu")
    with torch.no_grad():
        if kind == "int8":
            new = bnb.nn.Int8Params(dense.float().contiguous(), requires_grad=False, has_fp16_weights=False).to(device)
        else:
            state = old.quant_state
            source_dtype = state.original_dtype if _is_repacked(state) else state.dtype
            nested = state.original_nested if _is_repacked(state) else state.nested
            new = bnb.nn.Params4bit(
                dense.to(source_dtype).contiguous(),
                requires_grad=False,
                blocksize=state.blocksize,
                compress_statistics=nested,
                quant_type=state.quant_type,
                quant_storage=old.quant_storage,
                layer=layer,
            ).to(device)  # quantizes, and points layer.quant_state at the new state
        layer.weight = new
        if kind == "int8":
            layer.state.reset_grads()  # the next forward takes CB/SCB from the new weight
    return float((dequantize(layer).weight - weight.detach().float()).abs().max())


def to_dense(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """An ``nn.Linear`` with the quantized ``module``'s dequantized weight and bias, as ``dtype``.

    On the module's device; ``requires_grad`` follows the module's weight and bias. With
    float32 it computes what the module's training forward computes (float32 compute).
    """
    layer: Any = module
    weight, bias = dequantize(layer)
    device = layer.weight.device
    dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.weight.requires_grad_(layer.weight.requires_grad)
        if bias is not None:
            dense.bias.copy_(bias)
            dense.bias.requires_grad_(layer.bias.requires_grad)
    return dense


def base_without_bias(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x W0^T`` through the quantized layer's own forward (its kernel, its compute dtype) less its bias.

    Differentiable in ``x`` wherever the layer's forward is. The bias is subtracted in the
    output's dtype: float32 round-off for float32 compute, the compute dtype's otherwise.
    """
    layer: Any = module
    _check(layer)
    out = layer(x)
    return out - layer.bias.to(out.dtype) if layer.bias is not None else out


def state_stamp(module: nn.Module) -> tuple:
    """A value that changes whenever the layer's quantized state does (requantized, repacked, moved).

    A cache of anything derived from the dequantized weight (DVoRA's Gram pieces) is valid
    while the stamp is equal.
    """
    layer: Any = module
    kind = _check(layer)
    weight = layer.weight
    if kind == "int8":
        codes, scales = _int8_parts(layer)
        return (kind, id(weight), codes.data_ptr(), codes._version, scales.data_ptr(), codes.device)
    state = weight.quant_state
    return (kind, id(weight), weight.data.data_ptr(), id(state), _is_repacked(state), weight.device)


def restore_training_layout(module: nn.Module) -> bool:
    """Return a CPU-repacked 4-bit layer to the layout that trains; keep it from repacking again.

    The effective weight stays bit for bit what the repacked layer held (its bfloat16 block
    scales are kept, as float32, without the nested re-quantization bitsandbytes' own inverse
    does). Returns whether the layer was repacked. Other quantized layers are left as they
    are (False).
    """
    layer: Any = module
    kind = _check(layer)
    if kind == "int8":
        return False
    layer.support_avx512bf16_for_cpu = False  # bitsandbytes' switch: no repacking at later eval forwards
    state = layer.weight.quant_state
    if not _is_repacked(state):
        return False
    codes, absmax, _ = _four_bit_codes(layer)
    with torch.no_grad():
        layer.weight.data = codes  # in the storage dtype the layer was quantized with
        state.absmax = absmax
        state.nested = False
        state.dtype = state.original_dtype
        state.packing_format_for_cpu = False
    return True
