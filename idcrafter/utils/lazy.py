"""Packages whose names import on first use: `idcrafter.utils`, `idcrafter.core`, `idcrafter.data` and
`idcrafter.video` export their main names, but a tool that only validates input (and stops on bad
input) must not pay for torch or diffusers to do so."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], list[str]]:
    """(`__getattr__`, `__all__`) for `package`: `exports` maps each name to the module defining it."""

    def __getattr__(name: str) -> object:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(exports)
