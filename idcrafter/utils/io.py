"""Atomic writes: a crashed job never leaves a file or folder that looks finished."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool = False) -> None:
    """Give a temporary file (mkstemp: 0600) or folder (mkdtemp: 0700) the mode a plain
    open() / mkdir() would have given it under the user's umask, before it takes its final name."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the real suffix (writers such as imageio pick the format from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _publish_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def publish_file(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Move a finished file made elsewhere (a work folder) onto `dest` in one step, with the mode
    a plain open() would have given it under the user's umask.

    A rename is atomic only within one file system; when `dest` is on another one (a mount inside
    the output tree) the file is copied next to `dest` and renamed there, so `dest` still never
    exists half-written.
    """
    src, dest = Path(src), Path(dest)
    _publish_mode(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dest)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        with atomic_write(dest) as tmp:
            shutil.copyfile(src, tmp)
        src.unlink()
    return dest


@contextlib.contextmanager
def atomic_write_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Like `atomic_write` for a folder: fill the yielded temporary folder, then it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _publish_mode(tmp, directory=True)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_as_float16(src: str | os.PathLike, dest: str | os.PathLike, keep: tuple[str, ...] = ()) -> Path:
    """Copy a model folder to `dest` (replacing it) with every floating safetensors tensor stored as
    float16, except in subfolders named in `keep`. For shipping small models inside the package."""
    from safetensors.torch import load_file, save_file

    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    for path in dest.rglob("*.safetensors"):
        if path.parent.name in keep:
            continue
        tensors = load_file(str(path))
        save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt"})
    return dest
