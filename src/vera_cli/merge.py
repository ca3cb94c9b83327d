"""``vera merge``: fold an adapter into a safetensors file of base weights, with NumPy only.

The base file holds ``<layer>.weight`` (and ``<layer>.bias``) tensors. An adapter layer
``L`` matches the base layer ``L``, or the one base layer whose name ends in ``"." + L``
or that ``L`` ends in (PEFT module paths carry prefixes such as ``model.``). VeRA layers
become ``W0 + dW``; DVoRA layers ``m * (W0 + dW) / ||W0 + dW||``. The output keeps every
other tensor and the base file's metadata, and is written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from vera_cli.adapters import CliError, LoadedAdapter, load_adapter, projections
from vera_core.adapter_file import write_atomically
from vera_core.dvora import dvora_merge
from vera_core.vera import merge as vera_merge

_WEIGHT = ".weight"
_BIAS = ".bias"


def load_base(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a safetensors file of base weights.

    Raises
    ------
    CliError
        Missing, unreadable, or holding dtypes NumPy cannot represent (bfloat16).
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file

    source = Path(path)
    if not source.is_file():
        raise CliError(f"{source}: no such file")
    try:
        with safe_open(str(source), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(source)), metadata
    except Exception as error:  # safetensors raises its own error types for corrupt files and bfloat16
        hint = "; bfloat16 weights cannot be merged with NumPy" if "bf16" in str(error).lower() else ""
        raise CliError(f"{source}: not a readable safetensors file ({error}){hint}") from error


def match_layers(layer_names: list[str], base_keys: list[str], *, suffix: str = _WEIGHT) -> dict[str, str]:
    """Map every adapter layer to a base layer name (the key without ``suffix``, ``.weight``).

    Examples
    --------
    >>> match_layers(["model.layers.0.q_proj"], ["layers.0.q_proj.weight", "layers.0.k_proj.weight"])
    {'model.layers.0.q_proj': 'layers.0.q_proj'}

    Raises
    ------
    CliError
        Listing every layer with no match, or with several.
    """
    prefixes = [key[: -len(suffix)] for key in base_keys if key.endswith(suffix)]
    found: dict[str, str] = {}
    unmatched, ambiguous = [], []
    for name in layer_names:
        if name in prefixes:
            found[name] = name
            continue
        candidates = [p for p in prefixes if name.endswith(f".{p}") or p.endswith(f".{name}")]
        if len(candidates) == 1:
            found[name] = candidates[0]
        elif candidates:
            ambiguous.append(f"{name} ({' or '.join(candidates)})")
        else:
            unmatched.append(name)
    if ambiguous:
        raise CliError(f"adapter layers matching several base '<layer>{suffix}' keys: {', '.join(ambiguous)}")
    if unmatched:
        shown = ", ".join(prefixes[:6]) + (", ..." if len(prefixes) > 6 else "")
        raise CliError(
            f"adapter layers with no '<layer>{suffix}' in the base file: {', '.join(unmatched)} "
            f"(the base has {len(prefixes)} {'weights' if suffix == _WEIGHT else 'biases'}: {shown or 'none'})"
        )
    targets = list(found.values())
    if len(set(targets)) != len(targets):
        raise CliError(f"several adapter layers match the same base '<layer>{suffix}'; rename the layers")
    return found


def _check_finite(adapter: LoadedAdapter) -> None:
    bad = sorted(name for name, value in adapter.vectors.items() if not np.all(np.isfinite(value)))
    if bad:
        raise CliError(f"{adapter.path}: NaN or infinity in {', '.join(bad)}; refusing to merge")


def merge_weights(base: dict[str, np.ndarray], adapter: LoadedAdapter) -> dict[str, np.ndarray]:
    """A copy of ``base`` with the adapter folded into its matching layers.

    Raises
    ------
    CliError
        Unmatched layers, shapes that disagree, non-finite inputs or results.
    """
    _check_finite(adapter)
    config = adapter.config
    mapping = match_layers(list(config.layers), list(base))
    sizes = {}
    for name, target in mapping.items():
        spec = config.layers[name]
        weight = base[target + _WEIGHT]
        if weight.ndim != 2:
            raise CliError(f"{target}{_WEIGHT} has shape {weight.shape}; only 2-D (linear) weights can be merged")
        out_features, in_features = weight.shape[::-1] if spec.fan_in_fan_out else weight.shape
        if out_features != spec.out_features or spec.in_features not in (None, in_features):
            layout = "(in, out)" if spec.fan_in_fan_out else "(out, in)"
            raise CliError(
                f"{target}{_WEIGHT} has shape {weight.shape} but adapter layer {name} expects "
                f"out={spec.out_features}, in={spec.in_features or '?'} stored {layout}"
            )
        sizes[name] = in_features
    bias_targets = match_layers(list(config.bias_modules), list(base), suffix=_BIAS)
    for name, target in bias_targets.items():
        if base[target + _BIAS].shape != (config.bias_modules[name],):
            raise CliError(
                f"{target}{_BIAS} has shape {base[target + _BIAS].shape} but the adapter trained a bias of "
                f"{config.bias_modules[name]} for {name}"
            )
    A, B = projections(adapter, max_in=max(sizes.values()))
    merged = dict(base)
    for name, target in bias_targets.items():
        merged[target + _BIAS] = adapter.vectors[f"{name}{_BIAS}"].astype(base[target + _BIAS].dtype)
    for name, target in mapping.items():
        spec = config.layers[name]
        d, b = adapter.vectors[f"{name}.lambda_d"], adapter.vectors[f"{name}.lambda_b"]
        weight = base[target + _WEIGHT]
        if sizes[name] > A.shape[1]:
            raise CliError(f"layer {name} has {sizes[name]} inputs but the projections have max_in={A.shape[1]}")
        transposed = spec.fan_in_fan_out
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is then refused by safe=True
                if config.method == "dvora":
                    magnitude = adapter.vectors[f"{name}.magnitude"]
                    result, _ = dvora_merge(weight, A, B, magnitude, d, b, fan_in_fan_out=transposed, safe=True)
                else:
                    result = vera_merge(weight, A, B, d, b, fan_in_fan_out=transposed, safe=True)
        except (ValueError, TypeError) as error:
            if "NaN or infinity" in str(error):
                raise CliError(f"layer {name}: the merged weight holds NaN or infinity; refusing to merge") from error
            raise CliError(f"layer {name}: {error}") from error
        merged[target + _WEIGHT] = result
        if config.bias != "none":
            old = base.get(f"{target}.bias")
            bias = adapter.vectors[f"{name}.bias"]
            merged[f"{target}.bias"] = bias.astype(old.dtype if old is not None else weight.dtype)
    return merged


def run(args: argparse.Namespace) -> int:
    """Merge, then write the output atomically."""
    from safetensors.numpy import save_file

    base, metadata = load_base(args.base)
    adapter = load_adapter(args.adapter)
    merged = merge_weights(base, adapter)
    tensors = {name: np.ascontiguousarray(value) for name, value in merged.items()}
    write_atomically(args.output, lambda tmp: save_file(tensors, tmp, metadata=metadata or None))
    print(
        f"merged {len(adapter.config.layers)} {adapter.config.method} layers of {args.adapter} "
        f"into {args.base} -> {args.output}"
    )
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``vera merge``."""
    parser = subparsers.add_parser(
        "merge",
        help="fold an adapter into base weights (NumPy only)",
        description="Fold a VeRA or DVoRA adapter (vera-core file or PEFT folder) into a safetensors file of "
        "'<layer>.weight' tensors. Needs only NumPy, except for PEFT folders that do not store their "
        "projections (regenerating those needs torch). Refuses NaN or infinite results.",
    )
    parser.add_argument("--base", required=True, metavar="MODEL.safetensors", help="the base weights")
    parser.add_argument("--adapter", required=True, metavar="ADAPTER", help="adapter file or PEFT folder")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.safetensors", help="where to write")
    parser.set_defaults(run=run)
