"""Which layers an adapter targets, by name, with PEFT's matching rules.

Backends list their candidate layer names (module paths, or the keys of a weight
dictionary) and this module picks the targets; it knows nothing of any framework.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

ALL_LINEAR = "all-linear"
"""``target_modules`` value selecting every candidate layer (backends exclude output heads)."""


def _layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return None if match is None else int(match["idx"])


def matches(
    name: str,
    target_modules: str | Sequence[str],
    *,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> bool:
    """Whether layer ``name`` is targeted, as PEFT decides it.

    A string is a regular expression that must match the whole name; a list matches a
    name equal to an entry or ending in ``"." + entry``. ``layers_to_transform``
    further keeps only layers whose index (the number after ``layers_pattern``, or
    after the first numbered segment) is listed.

    Examples
    --------
    >>> matches("model.layers.0.q_proj", ["q_proj", "v_proj"])
    True
    >>> matches("model.layers.0.q_proj", r".*\\.v_proj")
    False
    >>> matches("model.layers.3.q_proj", ["q_proj"], layers_to_transform=[0, 1])
    False
    """
    if isinstance(target_modules, str):
        found = re.fullmatch(target_modules, name) is not None
    else:
        found = name in target_modules or any(name.endswith(f".{target}") for target in target_modules)
    if not found or layers_to_transform is None:
        return found
    wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
    return _layer_index(name, layers_pattern) in wanted


def select_targets(
    candidates: Iterable[str],
    target_modules: str | Sequence[str],
    *,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> list[str]:
    """The targeted names among ``candidates``, in their order.

    ``target_modules == "all-linear"`` selects every candidate (the backend passes only
    linear-like layers, output head excluded). Raises ValueError naming the patterns
    and a few candidates when nothing matches.

    Examples
    --------
    >>> select_targets(["enc.0.fc", "enc.1.fc", "head"], ["fc"])
    ['enc.0.fc', 'enc.1.fc']
    """
    names = list(candidates)
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        chosen = names
    else:
        if not isinstance(target_modules, str) and not target_modules:
            raise ValueError("target_modules is empty: name the layers to adapt, or pass 'all-linear'")
        chosen = [
            n
            for n in names
            if matches(n, target_modules, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern)
        ]
    if not chosen:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(
            f"target_modules={target_modules!r} (layers_to_transform={layers_to_transform!r}) matches none of "
            f"the {len(names)} candidate layers: {shown or 'none'}"
        )
    return chosen
