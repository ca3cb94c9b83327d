"""Hugging Face PEFT interop: load PEFT VeRA adapter folders, export ours for ``PeftModel``.

PEFT is *not* imported: folders are read and verified by the core's one loader
(:func:`vera_core.loading.read_adapter`) and written by :mod:`vera_core.peft_format`.
PEFT-origin adapters without stored projections are regenerated with PEFT's own recipe
(:func:`vera_core.generators.peft_projections`, ``prng_id`` ``"torch-mt19937-peft"``).
Exported folders always store the projections, so
``peft.PeftModel.from_pretrained(base, folder)`` reproduces our outputs (to float32
round-off: PEFT applies the vectors to activations, we fold them into B).
"""

from __future__ import annotations

import dataclasses
import os
import typing

from torch import nn

from vera_core.adapter_file import AdapterConfig, AdapterFileError, LayerSpec
from vera_core.loading import FORMAT_PEFT, read_adapter
from vera_core.peft_format import write_peft_folder
from vera_torch.distributed import is_sharded, write_once
from vera_torch.files import _load_into, _match_layers, adapter_config, adapter_tensors, to_host
from vera_torch.layers import layer_dims
from vera_torch.model import check_new_name, get_state

__all__ = ["load_peft_adapter", "save_peft_adapter"]


def load_peft_adapter(
    model: nn.Module,
    folder: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    activate: bool = False,
    max_bytes: int | None = None,
) -> AdapterConfig:
    """Load a PEFT VeRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) into ``model``.

    ``model`` is the *base* model PEFT wrapped (layer paths are those after
    ``base_model.model.``). Linear and Conv1D targets, with or without stored
    projections; read and verified by :func:`vera_core.loading.read_adapter` (byte budget
    ``max_bytes``), then checked against the model, before anything changes.

    Returns
    -------
    AdapterConfig
        The adapter as vera-core sees it (``in_features`` filled from the model).

    Raises
    ------
    vera_core.adapter_file.AdapterFileError
        Not a VeRA folder, or layers that do not fit the model.
    """
    source = str(folder)
    check_new_name(model, adapter_name)
    adapter = read_adapter(folder, max_bytes=max_bytes)
    if adapter.format != FORMAT_PEFT:
        raise AdapterFileError(f"{source} is a vera-core adapter file; load it with vera_torch.load_adapter")
    config = adapter.config
    targets = _match_layers(model, config, source)
    layers = {}
    in_sizes = []
    for path, spec in config.layers.items():
        n_in, n_out, fifo = layer_dims(targets[path])  # type: ignore[misc]
        in_sizes.append(n_in)
        layers[path] = LayerSpec(out_features=n_out, rank=spec.rank, in_features=n_in, fan_in_fan_out=fifo)
    max_in = config.max_in if config.max_in is not None else max(in_sizes)
    config = dataclasses.replace(config, layers=layers, max_in=max_in)
    _load_into(model, adapter, config, adapter_name, source)
    if activate:
        from vera_torch.model import set_adapter

        set_adapter(model, adapter_name)
    return config


def save_peft_adapter(model: nn.Module, folder: str | os.PathLike[str], adapter_name: str = "default") -> None:
    """Write one VeRA adapter as a PEFT folder that ``peft.PeftModel.from_pretrained`` loads.

    The projections are stored (PEFT >= 0.21 reads them back), sized like PEFT sizes them:
    over the adapter's own layers (a second adapter on fewer layers than the model's first
    stores the leading blocks of the shared pair, which is all its layers use). A layer of
    rank below the shared rank has ``lambda_d`` zero-padded (exact). DVoRA adapters cannot be
    exported (PEFT has no DVoRA): AdapterFileError. On a model sharded with FSDP2 every rank
    calls this and global rank 0 writes (as :func:`vera_torch.save_adapter`).
    """
    config = adapter_config(model, adapter_name)
    tensors = adapter_tensors(model, adapter_name, config)
    A, B = get_state(model).projections.get(get_state(model).settings[adapter_name].key)
    # PEFT sizes its pair from the adapter's own layers; the leading blocks are what they use
    max_in = max(typing.cast(int, spec.in_features) for spec in config.layers.values())
    max_out = max(spec.out_features for spec in config.layers.values())
    config = dataclasses.replace(config, max_in=max_in, max_out=max_out)
    host = {name: to_host(value) for name, value in tensors.items()}
    A_host, B_host = to_host(A[:, :max_in]), to_host(B[:max_out, :])
    write_once(lambda: write_peft_folder(folder, config, host, A_host, B_host), is_sharded(model.parameters()))
