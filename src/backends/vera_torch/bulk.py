"""Many adapters at once: load a folder of adapter files into the bank, save every adapter as a file.

:func:`load_adapters` reads every file through the one verified loader
(:func:`vera_core.read_adapter`: strict types, byte budget, payload and projection checksums;
the shared projections generated and checksummed once per distinct key), checks everything
against the model, and only then writes: the first adapter of each layout through
:func:`vera_torch.load_adapter`'s path, the rest as whole rows per layer (one copy per layer
and kind, not one per adapter). :func:`save_adapters` writes one ordinary adapter file each.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vera_core.adapter_file import AdapterConfig, AdapterFileError
from vera_core.loading import FORMAT_OURS, FORMAT_PEFT, ProjectionCache, VerifiedAdapter, read_adapter
from vera_core.peft_format import is_peft_folder
from vera_torch.bank import DVORA
from vera_torch.files import _load_into, save_adapter
from vera_torch.model import (
    STATE_NAME,
    VeraState,
    check_dvora_targets,
    check_new_name,
    get_state,
    reserve,
    vera_layers,
)
from vera_torch.peft import load_peft_adapter

__all__ = ["adapter_sources", "load_adapters", "save_adapters"]


def adapter_sources(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """The adapters in ``folder`` by name: ``<name>.safetensors`` files and ``<name>/`` PEFT folders, sorted.

    Examples
    --------
    >>> import tempfile
    >>> adapter_sources(tempfile.mkdtemp())
    {}
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder of adapters")
    found: dict[str, Path] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_file() and entry.suffix == ".safetensors":
            found[entry.stem] = entry
        elif entry.is_dir() and is_peft_folder(entry):
            found[entry.name] = entry
    return found


def _layout(config: AdapterConfig) -> tuple[Any, ...]:
    """What the checks against a model depend on: adapters of one layout fit the model alike."""
    return (
        config.method,
        config.r,
        config.prng_id,
        config.seed,
        config.max_in,
        config.max_out,
        config.projections_sha256,
        config.bias,
        tuple(sorted(config.bias_modules.items())),
        config.detach_norm,
        config.dropout,
        tuple((name, spec) for name, spec in config.layers.items()),
    )


def load_adapters(
    model: nn.Module,
    sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    names: Sequence[str] | None = None,
    *,
    max_bytes: int | None = None,
) -> list[str]:
    """Add many adapters from files (or PEFT folders) to the model's bank; returns their names.

    Every file is read and verified, and every adapter checked against the model, before
    the model changes: a bad file raises :class:`vera_core.AdapterFileError` naming it,
    and nothing is added. The banks grow once, to the exact number of adapters.

    Parameters
    ----------
    model : nn.Module
        The base model, with or without adapters.
    sources : path or iterable of paths
        A folder (every ``<name>.safetensors`` file and ``<name>/`` PEFT folder in it), or
        the files and folders themselves.
    names : sequence of str, optional
        The adapters' names; default each file's stem (a PEFT folder's name).
    max_bytes : int, optional
        The byte budget per file (see :func:`vera_core.read_adapter`).

    Examples
    --------
    >>> import os, tempfile
    >>> from torch import nn
    >>> import vera_torch as vt
    >>> donor = vt.add_vera(nn.Sequential(nn.Linear(8, 4)), ["0"], r=2)
    >>> folder = tempfile.mkdtemp()
    >>> for user in ("ann", "bob"):
    ...     _ = vt.save_adapter(donor, os.path.join(folder, f"{user}.safetensors"))
    >>> load_adapters(nn.Sequential(nn.Linear(8, 4)), folder)
    ['ann', 'bob']
    """
    if isinstance(sources, (str, os.PathLike)):
        found = adapter_sources(sources)
        paths, default = list(found.values()), list(found)
    else:
        paths = [Path(source) for source in sources]
        default = [path.stem if path.suffix == ".safetensors" else path.name for path in paths]
    chosen = list(default if names is None else names)
    if len(chosen) != len(paths):
        raise ValueError(f"{len(chosen)} names for {len(paths)} adapters")
    if len(set(chosen)) != len(chosen):
        twice = sorted({name for name in chosen if chosen.count(name) > 1})
        raise ValueError(f"adapter names given twice: {twice[:10]}")
    for name in chosen:
        check_new_name(model, name)
    cache = ProjectionCache()
    adapters = [read_adapter(path, max_bytes=max_bytes) for path in paths]
    for adapter in adapters:  # the projections verified now (once per distinct key), not while writing
        if adapter.format == FORMAT_OURS:
            adapter.projections(cache=cache)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, adapter in enumerate(adapters):
        groups.setdefault((adapter.format, _layout(adapter.config)), []).append(index)
    state = getattr(model, STATE_NAME, None)
    held = len(state.settings) if isinstance(state, VeraState) else 0
    for (kind, _), members in groups.items():  # every layout checked on a copy of its first adapter's path
        _check_layout(model, adapters[members[0]], kind)
    first = True
    for (kind, _), members in groups.items():
        lead = members[0]
        _load_one(model, adapters[lead], chosen[lead], kind, max_bytes)
        if first:
            reserve(model, held + len(adapters))
            first = False
        _write_rows(model, chosen[lead], [(chosen[i], adapters[i]) for i in members[1:]])
    return chosen


def _check_layout(model: nn.Module, adapter: VerifiedAdapter, kind: str) -> None:
    """Raise what loading ``adapter`` would raise, without changing the model (a dry run on the checks)."""
    from vera_torch.files import _match_layers, _other_bias_targets

    config, source = adapter.config, str(adapter.path)
    targets = _match_layers(model, config, source)
    if config.method == "dvora":
        try:
            check_dvora_targets(targets, f"{source}: ")
        except TypeError as error:
            raise AdapterFileError(str(error)) from error
    if kind == FORMAT_OURS:
        _other_bias_targets(model, config, source)


def _load_one(model: nn.Module, adapter: VerifiedAdapter, name: str, kind: str, max_bytes: int | None) -> None:
    if kind == FORMAT_PEFT:
        load_peft_adapter(model, adapter.path, name, max_bytes=max_bytes)
    else:
        _load_into(model, adapter, adapter.config, name, str(adapter.path))


def _write_rows(model: nn.Module, lead: str, rest: list[tuple[str, VerifiedAdapter]]) -> None:
    """Add ``rest`` (adapters of ``lead``'s layout) as whole rows per layer: one copy per layer and kind."""
    if not rest:
        return
    state = get_state(model)
    settings = state.settings[lead]
    for name, adapter in rest:
        if adapter.format == FORMAT_PEFT:  # PEFT folders: each through its own checks
            load_peft_adapter(model, adapter.path, name)
    rest = [(name, adapter) for name, adapter in rest if adapter.format != FORMAT_PEFT]
    if not rest:
        return
    slots = []
    for name, _ in rest:
        slot = state.slots.add(name)
        slots.append(slot)
        state.settings[name] = dataclasses.replace(settings, name=name)
        state.shared.specs[name] = state.shared.specs[lead]
        state.key_users[settings.key.name] += 1
    index = torch.tensor(slots)
    layers = vera_layers(model)
    for path in settings.layers:
        layer = layers[path]
        bank, lead_slot = layer.find(lead)  # type: ignore[misc]
        rank = bank.ranks[lead_slot]
        method = bank.methods[lead_slot]
        kinds = ("lambda_d", "lambda_b", *(("magnitude",) if method == DVORA else ()))
        kinds += ("bias",) if bank.own_bias[lead_slot] else ()
        params = bank.parameters_by_kind()
        with torch.no_grad():
            for kind in kinds:
                values = np.stack([np.asarray(adapter.vectors[f"{path}.{kind}"]) for _, adapter in rest])
                rows = torch.from_numpy(values).to(device=params[kind].device, dtype=params[kind].dtype)
                target = params[kind]
                if kind == "lambda_d":
                    target[index.to(target.device), :rank] = rows
                else:
                    target[index.to(target.device)] = rows
        for slot in slots:
            bank.mark(slot, method, rank, own_bias=bank.own_bias[lead_slot], detach_norm=bank.detach_norm[lead_slot])
    state.shared.changed()


def save_adapters(model: nn.Module, folder: str | os.PathLike[str], names: Sequence[str] | None = None) -> list[Path]:
    """Write every adapter (or ``names``) as ``folder/<name>.safetensors``, the ordinary format.

    Examples
    --------
    >>> import tempfile
    >>> from torch import nn
    >>> import vera_torch as vt
    >>> model = vt.add_vera(nn.Sequential(nn.Linear(8, 4)), ["0"], r=2, adapter_name="ann")
    >>> [p.name for p in save_adapters(model, tempfile.mkdtemp())]
    ['ann.safetensors']
    """
    state = get_state(model)
    chosen = list(state.settings if names is None else names)
    for name in chosen:
        if name not in state.settings:
            raise KeyError(f"no adapter named {name!r}")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for name in chosen:
        path = root / f"{name}.safetensors"
        save_adapter(model, path, name)
        written.append(path)
    return written
