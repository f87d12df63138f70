"""Command-line conventions and the input checks every boundary shares.

Bad input gets one line naming the input and the problem, exit code 2, no traceback and no file
written. Scripts parse with `ArgumentParser` (argparse's own errors become that one line), give
numeric options a checked `type=` (`integer`, `number`, `seed`), then check paths, devices and
the bounds a model sets with the functions below, before any model loads.

The rule that tells a user's mistake from a bug (docs/design.md 10): `InputError` is raised only
at the boundary, here, in `idcrafter.cli`, and in the manifest, job-file and request validation.
Library code raises the ordinary exceptions of `idcrafter.utils.errors` (`FileFormatError`,
`ConfigError`) or plain ValueError/TypeError; the boundary turns the first two (and
`FileNotFoundError`) into an `InputError` naming the option, with `user_file`. The scripts catch
`InputError` only, so any other exception, a real bug, keeps its traceback.

Nothing here imports torch at module level: a tool that stops on bad input stops fast.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from idcrafter.utils.errors import ConfigError, FileFormatError

EXIT_BAD_INPUT = 2
# Sampling steps beyond the schedulers' 1000 training timesteps (Wan and FLUX) only repeat timesteps.
MAX_SAMPLING_STEPS = 1000
# Guidance scales are single digits in practice; far beyond, the guided velocity overflows the
# sampler (a scale of 1e308 gave an all-black video).
MAX_GUIDANCE = 100.0
# torch.Generator.manual_seed and numpy's default_rng both take any seed in [0, 2**64).
SEED_MAX = 2**64 - 1


class InputError(ValueError):
    """Bad user input; scripts print its message as one line and exit with code 2.

    Raised only at the boundary (this module, `idcrafter.cli`, the manifest and job-file validation,
    the inference request checks); library code raises `idcrafter.utils.errors` instead.
    """


# The library's exceptions for a problem in what it was given (a file, a setting); anything else is a bug.
USER_FILE_ERRORS = (FileFormatError, ConfigError, FileNotFoundError)


@contextmanager
def user_file(flag: str = "") -> Iterator[None]:
    """Turn the library's file and settings errors raised inside into an `InputError` naming `flag`.

    Wrap the library calls that read what the user named (a model or adapter folder, a checkpoint
    to resume, a manifest, a media file): `FileFormatError`, `ConfigError` and `FileNotFoundError`
    become one line `flag: message` (the message alone when it already starts with `flag`, or when
    `flag` is empty because the library's message names the option). Every other exception passes
    through untouched: a plain ValueError, KeyError or RuntimeError is a bug and keeps its traceback.
    """
    try:
        yield
    except USER_FILE_ERRORS as err:
        message = str(err) if not isinstance(err, OSError) or not err.filename else f"{err.filename}: {err.strerror}"
        if flag and not message.startswith(flag):
            message = f"{flag}: {message}"
        raise InputError(message) from None


def fail(message: str) -> int:
    """Print `error: message` on stderr and return the bad-input exit code (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's convention: a usage error is one line `error: ...`, exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------ numbers


def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return "positive" if lo == 0 and lo_open else f"{'greater than' if lo_open else 'at least'} {lo:g}"
    if lo is None:
        return f"{'less than' if hi_open else 'at most'} {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def _named(name: str, text: str) -> str:
    return f"{name} {text}" if name else text


def check_number(value, name: str = "", lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """`value` as a finite float inside the interval; InputError naming `name` otherwise.

    NaN and infinities are refused whatever the bounds: no option of this project means them.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(_named(name, f"must be a number, got {value!r}"))
    value = float(value)
    if not math.isfinite(value):
        raise InputError(_named(name, f"must be a finite number, got {value}"))
    if (lo is not None and (value < lo or (lo_open and value == lo))) or (
        hi is not None and (value > hi or (hi_open and value == hi))
    ):
        raise InputError(_named(name, f"must be {_interval(lo, hi, lo_open, hi_open)}, got {value:g}"))
    return value


def launched_ranks() -> int:
    """WORLD_SIZE as the torchrun / deepspeed launchers set it (1 for a plain `python` run)."""
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def check_int(value, name: str = "", lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi]; InputError naming `name` otherwise (bools are not ints)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(_named(name, f"must be an integer, got {value!r}"))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else f"at most {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise InputError(_named(name, f"must be {bounds}, got {value}"))
    return value


def _argtype(parse: Callable[[str], object], check: Callable, label: str):
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {label}") from None
        try:
            return check(value)
        except InputError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = label
    return convert


def integer(lo: int | None = None, hi: int | None = None):
    """argparse `type=`: an int in [lo, hi]."""
    return _argtype(int, lambda v: check_int(v, "", lo, hi), "an integer")


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """argparse `type=`: a finite float in the interval (NaN and infinities refused)."""
    return _argtype(float, lambda v: check_number(v, "", lo, hi, lo_open, hi_open), "a number")


seed = integer(0, SEED_MAX)
seed.__doc__ = "argparse `type=`: a seed in [0, 2**64)."


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


# -------------------------------------------------------------------------------------------- paths


def path_problem(path: str | os.PathLike, kind: str = "file") -> str | None:
    """Why `path` is not an existing readable `kind` ("file" or "folder"), or None when it is.

    Tells the cases apart that `Path.is_file()` folds into False: missing, a folder where a file
    is expected (and the reverse), a broken link, a link loop, a parent that is a file, no access.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if err.errno == errno.ENOTDIR:
            return "does not exist (a folder on its path is a file)"
        if err.errno == errno.EACCES:
            return "cannot be accessed (permission denied)"
        if err.errno == errno.ENAMETOOLONG:
            return "is too long a path"
        if os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)})"
        return "does not exist"
    import stat

    if kind == "file" and stat.S_ISDIR(st.st_mode):
        return "is a folder, not a file"
    if kind == "folder" and not stat.S_ISDIR(st.st_mode):
        return "is a file, not a folder"
    if kind == "file" and not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if not os.access(path, os.R_OK | (os.X_OK if kind == "folder" else 0)):
        return "cannot be read (permission denied)"
    return None


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """An existing, readable file; InputError "`what` PATH is a folder, not a file" and the like."""
    problem = path_problem(path, "file")
    if problem:
        raise InputError(f"{what} {path} {problem}")
    return Path(path)


def check_input_dir(path: str | os.PathLike, what: str) -> Path:
    """An existing, readable folder."""
    problem = path_problem(path, "folder")
    if problem:
        raise InputError(f"{what} {path} {problem}")
    return Path(path)


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: str | os.PathLike, what: str, target: str | os.PathLike | None = None) -> None:
    """`folder` (or, when it does not exist yet, the nearest folder above it that does) is a folder
    this process can create files in. Tried with a real temporary file, removed at once: the
    permission bits do not tell for root, read-only mounts or immutable folders. The message
    names `target` (default: `folder`), the path the user gave."""
    folder = Path(folder)
    target = folder if target is None else target
    anchor = _nearest_existing(folder)
    if not anchor.is_dir():
        raise InputError(f"{what} {target}: cannot create it ({anchor} is a file)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=anchor)
    except OSError as err:
        reason = (err.strerror or err.__class__.__name__).lower()
        raise InputError(f"{what} {target}: cannot write in {anchor} ({reason})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | os.PathLike, what: str, suffixes: Iterable[str] | None = None) -> Path:
    """A file the run can write at the end: a known suffix, not an existing folder, in a folder
    that exists or can be created and that can be written. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name")
    if suffixes is not None:
        suffixes = tuple(suffixes)
        if path.suffix.lower() not in suffixes:
            raise InputError(f"{what} {path}: the output must end in {' or '.join(suffixes)}")
    if os.path.lexists(path) and not path.exists():
        problem = path_problem(path) or "cannot be resolved"
        raise InputError(f"{what} {path} {problem}")
    check_writable(path.parent, what, target=path)
    return path


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """A folder the run can write into: not a file, creatable or existing, writable. Creates nothing."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        problem = path_problem(path, "folder")
        raise InputError(f"{what} {path} {problem}")
    check_writable(path, what)
    return path


def check_preset(trained: str, requested: str | None, adapter: str | os.PathLike) -> None:
    """A --preset given with an adapter must be the one it was trained as: its config wins, so
    another preset would be silently ignored."""
    if requested is not None and requested != trained:
        raise InputError(f"--preset {requested} conflicts with the adapter {adapter}, trained as preset "
                         f"{trained!r}; leave --preset out")


# ------------------------------------------------------------------------------------------ devices

DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(text: str, what: str = "--dtype") -> str:
    if text not in DTYPES:
        raise InputError(f"{what} {text!r}: use {', '.join(DTYPES)}")
    return text


def check_device(text: str, what: str = "--device") -> str:
    """'cpu', 'cuda' or 'cuda:N' naming a device this machine has; InputError otherwise."""
    if text == "cpu":
        return text  # the common case, without importing torch
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"{what} {text!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return text
    if device.type != "cuda":
        raise InputError(f"{what} {text!r}: {device.type} devices are not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"{what} {text}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise InputError(f"{what} {text}: this machine has {count} CUDA device{'s' if count != 1 else ''}")
    return text
