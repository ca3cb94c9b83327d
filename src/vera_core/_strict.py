"""Strict reading of untrusted JSON: typed fields, named in every error, nothing ignored.

Every reader of a file's JSON (the safetensors header, the adapter config, PEFT's
``adapter_config.json``) goes through these helpers, so that a wrong type, a missing or
an unknown field is refused the same way: :class:`~vera_core.adapter_file.AdapterFileError`
naming the field, what it holds and what was expected. Booleans must be JSON booleans,
integers JSON integers (``4.0``, ``"4"`` and ``true`` are refused), floats finite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn, TypeVar

from vera_core.errors import AdapterFileError

T = TypeVar("T")


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, on one line (for error messages)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), "an object" if isinstance(value, dict) else "null" if value is None else type(value).__name__
    )


def refuse(where: str, expected: str, value: Any) -> NoReturn:
    """Raise AdapterFileError: ``where`` must be ``expected``, got ``value``."""
    raise AdapterFileError(f"{where} must be {expected}, got {shown(value)} ({_kind(value)})")


def _duplicate_free(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise AdapterFileError(f"duplicate key {shown(key)}")
        result[key] = value
    return result


def _no_constant(name: str) -> NoReturn:
    raise AdapterFileError(f"{name} is not a JSON number")


def parse_json(text: str | bytes, what: str) -> Any:
    """Parse JSON strictly: no duplicate keys, no NaN/Infinity, bounded nesting.

    Examples
    --------
    >>> parse_json('{"r": 4}', "config")
    {'r': 4}
    >>> parse_json('{"r": 4, "r": 5}', "config")
    Traceback (most recent call last):
    ...
    vera_core.errors.AdapterFileError: config is not valid JSON: duplicate key 'r'
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_duplicate_free, parse_constant=_no_constant)
    except AdapterFileError as error:
        raise AdapterFileError(f"{what} is not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        raise AdapterFileError(f"{what} is not UTF-8 text (byte {error.start})") from None
    except RecursionError:
        raise AdapterFileError(f"{what} is JSON nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, and integers of more than 4300 digits
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise AdapterFileError(f"{what} is not valid JSON: {message}") from None


def is_int(value: Any) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def integer(where: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an integer in ``[low, high]`` (bounds optional), else AdapterFileError."""
    if is_int(value) and (low is None or value >= low) and (high is None or value <= high):
        return int(value)
    bounds = (
        f" in [{low}, {high}]"
        if low is not None and high is not None
        else f" >= {low}"
        if low is not None
        else f" <= {high}"
        if high is not None
        else ""
    )
    refuse(where, f"an integer{bounds}", value)


def boolean(where: str, value: Any) -> bool:
    """``value`` if it is a boolean (JSON ``true``/``false``), else AdapterFileError."""
    if isinstance(value, bool):
        return value
    refuse(where, "true or false", value)


def finite(where: str, value: Any, *, low: float | None = None, below: float | None = None) -> float:
    """``value`` as a float if it is a finite number (an integer counts) in ``[low, below)``."""
    if (isinstance(value, float) or is_int(value)) and math.isfinite(float(value)):
        number = float(value)
        if (low is None or number >= low) and (below is None or number < below):
            return number
    bounds = f" in [{low}, {below})" if low is not None and below is not None else ""
    refuse(where, f"a finite number{bounds}", value)


def string(where: str, value: Any, *, choices: Iterable[str] | None = None, max_length: int = 4096) -> str:
    """``value`` if it is a string (one of ``choices`` when given), else AdapterFileError."""
    options = None if choices is None else tuple(choices)
    if isinstance(value, str) and len(value) <= max_length and (options is None or value in options):
        return value
    refuse(where, "a string" if options is None else f"one of {', '.join(map(repr, options))}", value)


def optional(check: Callable[..., T]) -> Callable[..., T | None]:
    """``check`` that lets ``None`` (JSON ``null``) through."""

    def checked(where: str, value: Any, **bounds: Any) -> T | None:
        return None if value is None else check(where, value, **bounds)

    return checked


def string_list(where: str, value: Any) -> list[str]:
    """``value`` if it is a list of strings, else AdapterFileError."""
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return list(value)
    refuse(where, "a list of strings", value)


def names_or_pattern(where: str, value: Any) -> str | list[str] | None:
    """``null``, a string, or a list of strings (``target_modules``, ``layers_pattern``)."""
    if value is None or isinstance(value, str):
        return value
    return string_list(where, value)


def mapping(where: str, value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else AdapterFileError."""
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        return dict(value)
    refuse(where, "an object", value)


def fields(
    where: str, value: Any, *, required: Iterable[str] = (), optional_fields: Iterable[str] = ()
) -> dict[str, Any]:
    """``value`` as an object with every ``required`` key and no key outside both lists."""
    found = mapping(where, value)
    needed, allowed = tuple(required), set(required) | set(optional_fields)
    missing = [key for key in needed if key not in found]
    if missing:
        raise AdapterFileError(f"{where} lacks the field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    unknown = sorted(key for key in found if key not in allowed)
    if unknown:
        listed = ", ".join(shown(key, 40) for key in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise AdapterFileError(f"{where} has unknown field{'s' if len(unknown) > 1 else ''} {listed}")
    return found
