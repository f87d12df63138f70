"""JSON values against a dataclass's annotations: configs read from adapter folders and job files
are user input, so a "3" where an int belongs, a list where a string belongs, or a NaN (which
Python's json module accepts) is refused with the field's name before anything compares or
computes with it."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

__all__ = ["check_json_fields"]


def _problem(value: Any, hint: Any) -> str | None:
    """Why `value` (decoded JSON) does not fit the annotation `hint`, or None."""
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        problems = [_problem(value, a) for a in args]
        if any(p is None for p in problems):
            return None
        # The right kind of value with a bad part (a list with a bad item) says what is wrong inside.
        inner = [p for p in problems if not p.startswith("must be")]
        return inner[0] if inner else f"must be {_describe(hint)}, got {_json_type(value)}"
    if hint is type(None):
        return None if value is None else "must be null"
    if hint is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {_json_type(value)}"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"must be an integer, got {_json_type(value)}"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {_json_type(value)}"
        return None if math.isfinite(value) else f"must be a finite number, got {value}"
    if hint is str:
        return None if isinstance(value, str) else f"must be a string, got {_json_type(value)}"
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return f"must be a list, got {_json_type(value)}"
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return f"needs {len(args)} values, got {len(value)}"
            items = zip(value, args)
        else:
            items = ((v, args[0] if args else Any) for v in value)
        for k, (item, item_hint) in enumerate(items):
            problem = _problem(item, item_hint)
            if problem:
                return f"item {k} {problem}"
        return None
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return f"must be an object, got {_json_type(value)}"
        return None
    return None  # annotations this schema does not model are left to the class itself


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "an object"
    return str(hint)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"[:80]
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def check_json_fields(cls: type, data: Any, what: str) -> None:
    """ValueError naming `what` and the field when `data` is not an object of `cls`'s fields with
    values of the annotated JSON types (unknown keys included)."""
    if not isinstance(data, dict):
        raise ValueError(f"{what}: must be a JSON object, got {_json_type(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {unknown}")
    for key, value in data.items():
        problem = _problem(value, hints[key])
        if problem:
            raise ValueError(f"{what}: {key!r} {problem}")
