"""Free TCP ports for the training runs tests launch, and the release of what DeepSpeed leaves in
/dev/shm under those ports.

DeepSpeed's CPU communication creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
(69 MB per rank) in `init_distributed` and never unlinks it. The trainer unlinks its names after the
first barrier (`idcrafter.train.trainer.release_shm_allreduce_name`); a run that dies or is killed
before that barrier leaves its name behind. conftest releases, at the end of the session, the names
of the ports this session handed out (`free_port`) that no live process maps: names of other test
sessions (parallel worktrees) have other ports, and a live run of any session maps its buffers.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

SHM = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer_"
# Ports handed out by `free_port` in this process.
USED_PORTS: set[int] = set()


def free_port() -> int:
    """A TCP port free now (the OS picks it), recorded in USED_PORTS."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    USED_PORTS.add(port)
    return port


def shm_names(folder: Path = SHM) -> set[str]:
    """Names of the DeepSpeed allreduce buffers in `folder`."""
    try:
        return {p.name for p in folder.iterdir() if p.name.startswith(SHM_PREFIX)}
    except OSError:
        return set()


def mapped_shm_names(folder: Path = SHM, proc: Path = Path("/proc")) -> set[str]:
    """Buffer names in `folder` some live process has mapped (its /proc/<pid>/maps lists the file)."""
    names = set()
    for maps in proc.glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        for line in text.splitlines():
            path = line.rsplit(" ", 1)[-1]
            if path.startswith(str(folder / SHM_PREFIX)):
                names.add(Path(path).name)
    return names


def owned_leftovers(names: set[str], before: set[str], ports: set[int], mapped: set[str],
                    uid: int | None = None) -> list[str]:
    """The names among `names` this session may unlink: created during it (not in `before`), of this
    user and of one of `ports`, and mapped by no live process. Sorted."""
    uid = os.getuid() if uid is None else uid
    out = []
    for name in names - before - mapped:
        parts = name[len(SHM_PREFIX):].split("_")  # uid, address, port, rank
        if len(parts) < 4:
            continue
        owner, port, rank = parts[0], parts[-2], parts[-1]
        if owner == str(uid) and port.isdigit() and rank.isdigit() and int(port) in ports:
            out.append(name)
    return sorted(out)


def release_leftovers(before: set[str], folder: Path = SHM) -> list[str]:
    """Unlink this session's leftover buffers (see `owned_leftovers`); returns their names."""
    names = owned_leftovers(shm_names(folder), before, USED_PORTS, mapped_shm_names(folder))
    for name in names:
        try:
            (folder / name).unlink()
        except OSError:
            pass
    return names
