"""Optional dependencies.

Heavy or platform-specific packages (insightface, flash-attn, decord, gradio) are imported inside
the function that needs them, through `require`, so importing the package never needs them and a
missing one produces an error that says which pip extra installs it.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# module name -> (pip extra, pip package) for the error message.
_EXTRAS: dict[str, tuple[str, str]] = {
    "flash_attn": ("flash", "flash-attn"),
    "insightface": ("face", "insightface"),
    "onnxruntime": ("face", "onnxruntime"),
    "dlib": ("face", "dlib-bin"),
    "face_recognition_models": ("face", "face-recognition-models"),
    "decord": ("video", "decord"),
    "gradio": ("demo", "gradio"),
}


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the pip extra."""


def is_available(module: str) -> bool:
    """True when `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import an optional dependency or raise one clear error naming the pip extra.

    >>> np = require("numpy")
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        known_extra, package = _EXTRAS.get(module, (None, module.replace("_", "-")))
        extra = extra or known_extra
        hint = f'pip install -e ".[{extra}]"' if extra else f"pip install {package}"
        raise MissingDependencyError(
            f"optional dependency '{module}' is not installed ({err}); install it with: {hint}"
        ) from None
