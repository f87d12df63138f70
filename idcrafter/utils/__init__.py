"""Small helpers shared by every part of the package: optional imports, logging, seeding, files.

Names are imported on first use, so a command-line tool that stops on bad input (through
`idcrafter.utils.cli`) does so before torch is imported.
"""

from idcrafter.utils.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "MissingDependencyError": "idcrafter.utils.deps",
    "is_available": "idcrafter.utils.deps",
    "require": "idcrafter.utils.deps",
    "atomic_write": "idcrafter.utils.io",
    "atomic_write_dir": "idcrafter.utils.io",
    "get_logger": "idcrafter.utils.logging",
    "setup_logging": "idcrafter.utils.logging",
    "seed_everything": "idcrafter.utils.seed",
})
