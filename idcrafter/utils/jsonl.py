"""Line-by-line JSONL reading that reports bad lines by number instead of stopping at the first."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from idcrafter.utils.errors import FileFormatError


def read_jsonl(path: str | os.PathLike, what: str = "file") -> Iterator[tuple[int, object | None, str | None]]:
    """Yield (line number, parsed record or None, error message or None) for every non-blank line.

    A file that cannot be read at all raises one `FileFormatError` naming it (`what`: "manifest", ...).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileFormatError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise FileFormatError(f"{path}: is a folder, not a {what}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise FileFormatError(f"{path}: cannot read the {what} ({err})") from None
    # split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw), None
        except json.JSONDecodeError as err:
            yield number, None, f"not valid JSON ({err.msg} at column {err.colno})"
