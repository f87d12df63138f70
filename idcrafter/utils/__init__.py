"""Small helpers shared by every part of the package: optional imports, logging, seeding, files."""

from idcrafter.utils.deps import MissingDependencyError, is_available, require
from idcrafter.utils.io import atomic_write, atomic_write_dir
from idcrafter.utils.logging import get_logger, setup_logging
from idcrafter.utils.seed import seed_everything

__all__ = [
    "MissingDependencyError",
    "atomic_write",
    "atomic_write_dir",
    "get_logger",
    "is_available",
    "require",
    "seed_everything",
    "setup_logging",
]
