"""``vera merge``: fold an adapter into a safetensors file of base weights, with NumPy only.

The base file holds ``<layer>.weight`` (and ``<layer>.bias``) tensors. An adapter layer
``L`` matches the base layer ``L``, or the one base layer whose name ends in ``"." + L``
or that ``L`` ends in (PEFT module paths carry prefixes such as ``model.``). VeRA layers
become ``W0 + dW``; DVoRA layers ``m * (W0 + dW) / ||W0 + dW||``. The output keeps every
other tensor and the base file's metadata, and is written atomically; it may not
replace the base or adapter file unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from vera_cli.common import CliError, add_max_bytes, budget
from vera_core import safetensors_file
from vera_core.dvora import dvora_merge
from vera_core.loading import VerifiedAdapter, read_adapter
from vera_core.vera import merge as vera_merge

_WEIGHT = ".weight"
_BIAS = ".bias"


def load_base(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (read-only NumPy arrays) and metadata of a safetensors file of base weights.

    Raises
    ------
    AdapterFileError
        Missing, not a regular file, or not a valid safetensors file.
    CliError
        Holding dtypes NumPy cannot represent (bfloat16, float8).
    """
    contents = safetensors_file.read(path, "a safetensors file of base weights")
    foreign = sorted(key for key, entry in contents.entries.items() if entry.dtype in ("BF16", "F8_E4M3", "F8_E5M2"))
    if foreign:
        code = contents.entries[foreign[0]].dtype
        raise CliError(f"{path}: {foreign[0]} is {code}; {code} weights cannot be merged with NumPy")
    return {key: contents.raw(key) for key in contents.entries}, contents.metadata


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


def merge_weights(base: dict[str, np.ndarray], adapter: VerifiedAdapter) -> dict[str, np.ndarray]:
    """A copy of ``base`` with the adapter folded into its matching layers.

    Raises
    ------
    CliError
        Unmatched layers, shapes that disagree, non-finite results.
    """
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
    A, B = adapter.projections(max_in=max(sizes.values()))
    merged = dict(base)
    for name, target in bias_targets.items():
        merged[target + _BIAS] = adapter.vectors[f"{name}{_BIAS}"].astype(base[target + _BIAS].dtype)
    for name, target in mapping.items():
        spec = config.layers[name]
        d, b = adapter.vectors[f"{name}.lambda_d"], adapter.vectors[f"{name}.lambda_b"]
        weight = base[target + _WEIGHT]
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


def _same_file(first: str, second: str) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:  # one is missing (or a symbolic link loop): compare the names
        return os.path.realpath(first) == os.path.realpath(second)


def run(args: argparse.Namespace) -> int:
    """Merge, then write the output atomically."""
    for role in ("base", "adapter"):
        if _same_file(args.output, getattr(args, role)) and not args.force:
            raise CliError(f"-o {args.output} is the --{role} file; give another output, or --force to replace it")
    max_bytes = budget(args)
    base, metadata = load_base(args.base)
    adapter = read_adapter(args.adapter, max_bytes=max_bytes)
    merged = merge_weights(base, adapter)
    safetensors_file.write(args.output, merged, metadata or None)
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
    parser.add_argument("--force", action="store_true", help="allow -o to replace the --base or --adapter file")
    add_max_bytes(parser)
    parser.set_defaults(run=run)
