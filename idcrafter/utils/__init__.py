"""Small helpers shared by every part of the package: optional imports, logging, seeding, files.

Names are imported on first use, so a command-line tool that stops on bad input (through
`idcrafter.utils.cli`) does so before torch is imported.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MissingDependencyError": "idcrafter.utils.deps",
    "is_available": "idcrafter.utils.deps",
    "require": "idcrafter.utils.deps",
    "atomic_write": "idcrafter.utils.io",
    "atomic_write_dir": "idcrafter.utils.io",
    "get_logger": "idcrafter.utils.logging",
    "setup_logging": "idcrafter.utils.logging",
    "seed_everything": "idcrafter.utils.seed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'idcrafter.utils' has no attribute {name!r}")
