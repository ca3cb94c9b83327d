"""Serving adapters from disk with bounded memory: at most ``capacity`` resident, least recently used evicted.

A million adapter files on disk, a few thousand in the model: :class:`AdapterPager` loads each
adapter a batch asks for that is not resident (through the same verified loaders as
:func:`vera_torch.load_adapter`), evicting the least recently used ones the batch does not
need. An evicted adapter's bank row is reused by the next one loaded, so the banks never grow
past ``capacity`` rows.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from vera_core.peft_format import is_peft_folder
from vera_torch.files import load_adapter
from vera_torch.layers import BASE_ADAPTER
from vera_torch.model import STATE_NAME, VeraState, adapter_index, adapter_names, delete_adapter, reserve
from vera_torch.peft import load_peft_adapter

__all__ = ["AdapterPager"]


def _in_folder(folder: Path) -> Callable[[str], Path]:
    """``name`` -> ``folder/name.safetensors`` (our file) or ``folder/name`` (a PEFT folder)."""

    def locate(name: str) -> Path:
        file = folder / f"{name}.safetensors"
        if file.is_file():
            return file
        if is_peft_folder(folder / name):
            return folder / name
        raise FileNotFoundError(f"no adapter {name!r} in {folder}: neither {file.name} nor a PEFT folder {name}/")

    return locate


class AdapterPager:
    """At most ``capacity`` adapters of ``model`` resident, paged in from disk on demand.

    Parameters
    ----------
    model : nn.Module
        The base model (adapters already in it count towards ``capacity`` and may be evicted).
    source : path or callable
        A folder holding ``<name>.safetensors`` files or ``<name>/`` PEFT folders, or a
        function from an adapter name to its path.
    capacity : int
        The most adapters resident at once.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> import vera_torch as vt
    >>> folder = tempfile.mkdtemp()
    >>> trained = vt.add_vera(nn.Sequential(nn.Linear(8, 4)), ["0"], r=2, adapter_name="u1")
    >>> _ = vt.save_adapter(trained, os.path.join(folder, "u1.safetensors"), "u1")
    >>> _ = vt.save_adapter(trained, os.path.join(folder, "u2.safetensors"), "u1")
    >>> pager = AdapterPager(nn.Sequential(nn.Linear(8, 4)), folder, capacity=1)
    >>> with pager.rows(["u1", "__base__"]):
    ...     y = pager.model(torch.randn(2, 8))
    >>> with pager.rows(["u2"]):
    ...     y = pager.model(torch.randn(1, 8))
    >>> pager.resident(), pager.loads, pager.evictions
    (['u2'], 2, 1)
    """

    def __init__(self, model: nn.Module, source: str | os.PathLike[str] | Callable[[str], Path], capacity: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        if callable(source):
            self.locate = source
        else:
            folder = Path(source)
            if not folder.is_dir():
                raise NotADirectoryError(f"{folder} is not a folder of adapters")
            self.locate = _in_folder(folder)
        self.model = model
        self.capacity = capacity
        state = getattr(model, STATE_NAME, None)
        self._lru: collections.OrderedDict[str, None] = collections.OrderedDict(
            (name, None) for name in (state.settings if isinstance(state, VeraState) else ())
        )
        if len(self._lru) > capacity:
            raise ValueError(f"the model already holds {len(self._lru)} adapters, more than capacity={capacity}")
        self.loads = 0
        """Adapters loaded from disk so far."""
        self.evictions = 0
        """Adapters evicted so far."""

    def resident(self) -> list[str]:
        """The resident adapters, least recently used first."""
        return list(self._lru)

    def ensure(self, names: Sequence[str]) -> None:
        """Make every adapter of ``names`` resident (``"__base__"`` needs none), evicting others as needed."""
        wanted = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER))
        if len(wanted) > self.capacity:
            raise ValueError(f"a batch of {len(wanted)} distinct adapters does not fit capacity={self.capacity}")
        missing = [n for n in wanted if n not in self._lru]
        paths = {name: self.locate(name) for name in missing}  # every file found before anything is evicted
        for name in wanted:
            if name in self._lru:
                self._lru.move_to_end(name)
        for name in missing:
            if len(self._lru) >= self.capacity:
                victim = next(iter(self._lru))
                delete_adapter(self.model, victim)
                del self._lru[victim]
                self.evictions += 1
            path = paths[name]
            load = load_peft_adapter if path.is_dir() else load_adapter
            load(self.model, path, name)
            if self.loads == 0:
                reserve(self.model, self.capacity)
            self._lru[name] = None
            self.loads += 1

    def index(self, names: Sequence[str]) -> torch.Tensor:
        """:func:`vera_torch.adapter_index` of ``names``, paging in what is missing first."""
        self.ensure(names)
        return adapter_index(self.model, names)

    @contextlib.contextmanager
    def rows(self, names: Sequence[str]) -> Iterator[None]:
        """:func:`vera_torch.adapter_names` for the block, paging in what is missing first."""
        with adapter_names(self.model, self.index(names)):
            yield
