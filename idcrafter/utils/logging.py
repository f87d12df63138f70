"""One logging set-up for scripts and library code; only rank 0 talks at INFO by default."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging(level: int | str = logging.INFO, all_ranks: bool = False) -> None:
    """Configure the root `idcrafter`/`mcimage` loggers once (idempotent).

    Ranks other than 0 log warnings only unless `all_ranks`, so multi-GPU runs stay readable.
    """
    if isinstance(level, str):
        level = getattr(logging, level.upper())
    if not all_ranks and _rank() != 0:
        level = max(level, logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    rank_tag = f"[rank{_rank()}] " if "WORLD_SIZE" in os.environ else ""
    handler.setFormatter(logging.Formatter(rank_tag + _FORMAT, datefmt="%H:%M:%S"))
    for name in ("idcrafter", "mcimage"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
