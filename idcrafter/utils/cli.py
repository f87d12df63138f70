"""Command-line conventions: bad input gets one line naming the problem and exit code 2."""

from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """Bad user input; scripts print its message as one line and exit with code 2."""


def fail(message: str) -> int:
    """Print `error: message` on stderr and return the bad-input exit code (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
