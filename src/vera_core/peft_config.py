"""PEFT's ``adapter_config.json`` for VeRA, parsed strictly.

Every field of ``peft.VeraConfig`` (PEFT 0.21) is checked for its type: booleans are
JSON booleans, integers JSON integers, ``r`` is required; an unknown field is refused
rather than ignored, and so is a non-empty ``modules_to_save`` (those are whole trained
modules, which a VeRA adapter file does not hold).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vera_core import _strict as s
from vera_core.errors import AdapterFileError

BIAS_MODES = ("none", "all", "vera_only")

MAX_SIZE = 2**32 - 1
"""The largest rank or feature count an adapter may declare (the generators' limit)."""

REQUIRED = ("peft_type", "r")
OPTIONAL = (
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "d_initial",
    "fan_in_fan_out",
    "inference_mode",
    "init_weights",
    "layers_pattern",
    "layers_to_transform",
    "modules_to_save",
    "peft_version",
    "projection_prng_key",
    "revision",
    "save_projection",
    "target_modules",
    "task_type",
    "vera_dropout",
)


@dataclasses.dataclass(frozen=True)
class PeftVeraConfig:
    """The fields of a PEFT VeRA ``adapter_config.json`` that matter to an adapter (checked)."""

    r: int
    seed: int
    """``projection_prng_key``."""
    save_projection: bool
    dropout: float
    """``vera_dropout``."""
    d_initial: float
    fan_in_fan_out: bool
    bias: str
    target_modules: str | list[str] | None
    raw: dict[str, Any]
    """The whole config as read (every field checked)."""


def _layers_to_transform(where: str, value: Any) -> None:
    if value is None or s.is_int(value):
        return
    if isinstance(value, list) and all(s.is_int(item) for item in value):
        return
    s.refuse(where, "null, an integer or a list of integers", value)


def parse_peft_config(value: Any, where: str = "adapter_config.json") -> PeftVeraConfig:
    """Check a decoded ``adapter_config.json`` and return what the adapter needs from it.

    Raises
    ------
    AdapterFileError
        Naming the first field that is missing, unknown or of the wrong type.

    Examples
    --------
    >>> parse_peft_config({"peft_type": "VERA", "r": 4}).seed
    0
    >>> try:
    ...     parse_peft_config({"peft_type": "VERA", "r": 4.7})
    ... except AdapterFileError as error:
    ...     print(error)
    adapter_config.json field 'r' must be an integer in [1, 4294967295], got 4.7 (a number)
    """
    raw = s.fields(where, value, required=REQUIRED, optional_fields=OPTIONAL)
    field = f"{where} field"
    peft_type = s.string(f"{field} 'peft_type'", raw["peft_type"])
    if peft_type != "VERA":
        raise AdapterFileError(f"{field} 'peft_type' is {s.shown(peft_type)}: not a PEFT VeRA adapter ('VERA')")
    r = s.integer(f"{field} 'r'", raw["r"], low=1, high=MAX_SIZE)
    seed = s.integer(f"{field} 'projection_prng_key'", raw.get("projection_prng_key", 0), low=0, high=2**64 - 1)
    save_projection = s.boolean(f"{field} 'save_projection'", raw.get("save_projection", True))
    dropout = s.finite(f"{field} 'vera_dropout'", raw.get("vera_dropout", 0.0), low=0.0, below=1.0)
    d_initial = s.finite(f"{field} 'd_initial'", raw.get("d_initial", 0.1))
    fan_in_fan_out = s.boolean(f"{field} 'fan_in_fan_out'", raw.get("fan_in_fan_out", False))
    bias = s.string(f"{field} 'bias'", raw.get("bias", "none"), choices=BIAS_MODES)
    target_modules = s.names_or_pattern(f"{field} 'target_modules'", raw.get("target_modules"))
    for name in ("inference_mode", "init_weights"):
        if name in raw:
            s.boolean(f"{field} {name!r}", raw[name])
    for name in ("base_model_name_or_path", "revision", "task_type", "peft_version"):
        s.optional(s.string)(f"{field} {name!r}", raw.get(name))
    s.names_or_pattern(f"{field} 'layers_pattern'", raw.get("layers_pattern"))
    _layers_to_transform(f"{field} 'layers_to_transform'", raw.get("layers_to_transform"))
    if raw.get("auto_mapping") is not None:
        s.mapping(f"{field} 'auto_mapping'", raw["auto_mapping"])
    modules_to_save = raw.get("modules_to_save")
    if modules_to_save is not None and s.string_list(f"{field} 'modules_to_save'", modules_to_save):
        raise AdapterFileError(
            f"{where} lists modules_to_save {s.shown(modules_to_save)}: whole trained modules, which vera-core "
            "does not load; only VeRA vectors (and biases) are supported"
        )
    return PeftVeraConfig(r, seed, save_projection, dropout, d_initial, fan_in_fan_out, bias, target_modules, raw)
