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


def parse_size(text: str, flag: str = "--size", multiple: int | None = None) -> tuple[int, int]:
    """'480x832' (height x width) -> (480, 832); InputError naming `flag` for bad syntax, sizes that
    are not positive, or (with `multiple`) not multiples of it."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected HEIGHTxWIDTH, e.g. 480x832") from None
    if height <= 0 or width <= 0:
        raise InputError(f"{flag} {text}: height and width must be positive")
    if multiple and (height % multiple or width % multiple):
        raise InputError(f"{flag} {text}: height and width must be positive multiples of {multiple}")
    return height, width
