"""Checkpoints that are complete or invisible, and a resume that unpickles nothing but state.

A checkpoint is the folder OUTPUT/checkpoints/step_XXXXXXXX. It holds DeepSpeed's own files
(`*_model_states.pt`, `*_optim_states.pt`), and from every rank r `trainer_rank{r}.json` (step,
epoch, data position, skipped batches) and, with EMA, `ema_rank{r}.pt`. Rank 0 writes the marker
`complete.json` last, once every rank has finished writing: the step, the world size, the ZeRO stage
and every file of the folder with its size. Only then does `latest` move. A kill at any moment
therefore leaves either a complete checkpoint or a folder that resume recognises as unfinished (no
marker, or a listed file missing or of another size) and walks past.

DeepSpeed assumes one filesystem shared by every rank for checkpoints, and so does this module: rank
0 lists the files all ranks wrote, and decides for all ranks which checkpoint to resume.

Resume unpickles with `torch.load(..., weights_only=True)` only: tensors, plain containers, and the
few DeepSpeed classes its optimizer state holds (`deepspeed_safe_globals`). A file that needs any
other global (a copied run folder whose pickle would run code) stops the run with a `FileFormatError`
naming the file and the refused global, and nothing in it runs.
"""

from __future__ import annotations

import functools
import json
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from idcrafter.utils.errors import ConfigError, FileFormatError
from idcrafter.utils.io import atomic_write

MARKER = "complete.json"
LATEST = "latest"
MARKER_FORMAT = 1
_TAG = re.compile(r"step_(\d+)")


class Incomplete(Exception):
    """A checkpoint folder that cannot be resumed from (unfinished or damaged); the message says why."""


# ------------------------------------------------------------------------------------------ names


def step_tag(step: int) -> str:
    """The folder name of the checkpoint after `step` optimizer steps (sorts by step up to 10^8)."""
    return f"step_{step:08d}"


def tag_step(name: str) -> int | None:
    """The step of a `step_*` folder name, None for any other name."""
    match = _TAG.fullmatch(name)
    return int(match.group(1)) if match else None


def step_folders(ckpt_dir: Path) -> list[Path]:
    """The `step_*` folders of `ckpt_dir`, newest (highest step) first."""
    if not ckpt_dir.is_dir():
        return []
    folders = [p for p in ckpt_dir.iterdir() if p.is_dir() and tag_step(p.name) is not None]
    return sorted(folders, key=lambda p: tag_step(p.name), reverse=True)


def snapshot_file(name: str, rank: int) -> str:
    """A rank's copy of a parameter snapshot: `ema_rank{r}.pt`, `start_policy_rank{r}.pt`, ..."""
    return f"{name}_rank{rank}.pt"


def ema_file(rank: int) -> str:
    return snapshot_file("ema", rank)


def state_file(rank: int) -> str:
    return f"trainer_rank{rank}.json"


# ------------------------------------------------------------------------------------------ the marker


@dataclass(frozen=True)
class Marker:
    """What `complete.json` records about a finished checkpoint."""

    step: int
    world_size: int
    zero_stage: int
    files: dict[str, int]  # path inside the folder (POSIX) -> size in bytes


def list_files(folder: Path) -> dict[str, int]:
    """Every file under `folder` (DeepSpeed's NVMe offload writes subfolders) except the marker."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def write_marker(folder: Path, step: int, world_size: int, zero_stage: int) -> Marker:
    """Seal a checkpoint whose files every rank has finished writing (call after a barrier)."""
    marker = Marker(step, world_size, zero_stage, list_files(folder))
    body = {"format": MARKER_FORMAT, "step": step, "world_size": world_size, "zero_stage": zero_stage,
            "files": marker.files}
    with atomic_write(folder / MARKER) as tmp:
        tmp.write_text(json.dumps(body, indent=1))
    return marker


def parse_marker(text: str) -> Marker:
    """`complete.json` text -> Marker; ValueError for anything but the format `write_marker` writes."""
    body = json.loads(text)
    if not isinstance(body, dict) or body.get("format") != MARKER_FORMAT:
        raise ValueError(f"not format {MARKER_FORMAT}")
    for key in ("step", "world_size", "zero_stage"):
        if type(body.get(key)) is not int or body[key] < 0:
            raise ValueError(f"{key} is not a count")
    files = body.get("files")
    if not isinstance(files, dict) or not files or not all(
        isinstance(k, str) and type(v) is int and v >= 0 for k, v in files.items()
    ):
        raise ValueError("files is not a map of names to sizes")
    return Marker(body["step"], body["world_size"], body["zero_stage"], files)


def check_files(folder: Path) -> Marker:
    """The marker of a finished checkpoint whose listed files are all there with their sizes.

    Sizes catch what a kill or a full disk leaves (missing and truncated files) without reading
    gigabytes of optimizer state; `check_unpickling` then reads what resume would unpickle.
    """
    if not folder.is_dir():
        raise Incomplete("no such folder")
    path = folder / MARKER
    if not path.is_file():
        raise Incomplete(f"no {MARKER} (the save did not finish)")
    try:
        marker = parse_marker(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise Incomplete(f"{MARKER} is unreadable ({err})") from None
    if tag_step(folder.name) not in (None, marker.step):
        raise Incomplete(f"{MARKER} is for step {marker.step}")
    for name, size in marker.files.items():
        file = folder / name
        if not file.is_file():
            raise Incomplete(f"{name} is missing")
        actual = file.stat().st_size
        if actual != size:
            raise Incomplete(f"{name} has {actual} bytes, {MARKER} lists {size}")
    return marker


def discard(folder: Path, strict: bool = True) -> None:
    """Delete a checkpoint folder, marker first: an interrupted delete never leaves a sealed remnant."""
    (folder / MARKER).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=not strict)


def write_latest(ckpt_dir: Path, tag: str) -> None:
    """`latest` names the newest complete checkpoint, for people and DeepSpeed's own tools; resume
    reads the markers, never this file."""
    with atomic_write(ckpt_dir / LATEST) as tmp:
        tmp.write_text(tag)


def prune(ckpt_dir: Path, keep_last: int, current_step: int) -> list[str]:
    """Keep the newest `keep_last` complete checkpoints up to `current_step`; delete the older ones
    and every unfinished folder up to `current_step` (it can never be resumed). Folders of later
    steps, left by an attempt this run was resumed before, are left alone. Returns what it deleted."""
    complete, unfinished = [], []
    for folder in step_folders(ckpt_dir):
        if tag_step(folder.name) > current_step:
            continue
        try:
            check_files(folder)
            complete.append(folder)
        except Incomplete:
            unfinished.append(folder)
    doomed = complete[keep_last:] + unfinished
    for folder in doomed:
        discard(folder, strict=False)
    return [f.name for f in doomed]


# ------------------------------------------------------------------------------------------ safe unpickling


def deepspeed_safe_globals() -> list:
    """The classes beyond tensors and plain containers that DeepSpeed's own checkpoints pickle.

    Found by saving real ZeRO-2 and ZeRO-3 checkpoints and loading every file with
    weights_only=True (model states and EMA files need none), and by reading the optimizers'
    `state_dict()` in deepspeed 0.19 for what a GPU (bf16) or fp16 run adds.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        # state_dict()["loss_scaler"] of the ZeRO-1/2 (zero/stage_1_and_2.py) and ZeRO-3
        # (zero/stage3.py) optimizers: CreateLossScaler gives a static LossScaler(1.0) for fp32 and bf16 ...
        LossScaler,
        # ... and a DynamicLossScaler when a DeepSpeed config turns on fp16 (dynamic loss scaling).
        DynamicLossScaler,
        # state_dict()["zero_stage"] of the same two optimizers.
        ZeroStageEnum,
        # state_dict()["param_slice_mappings"] of ZeRO-1/2 and of the bf16 optimizer without ZeRO
        # (bf16_optimizer.py): the slice of each parameter a rank holds.
        fragment_address,
    ]


def refused_global(message: str) -> str:
    """The global torch's weights-only unpickler refused, from its error message (one line)."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    if match:
        return f"it needs the global {match.group(1)}, which is not allowed"
    for line in message.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return first_line(message)


def first_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return lines[0] if lines else "no details"


def safe_load(path: str | Path, map_location: Any = None, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` with DeepSpeed's few classes allowed.

    FileFormatError (one line: the file and the refused global) when the pickle asks for anything else;
    torch refuses before calling it, so nothing in the file runs.
    """
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise
        raise FileFormatError(f"checkpoint file {path}: {refused_global(str(err))}; resume loads tensors and "
                              f"DeepSpeed's own state only, and nothing in this file was run") from None


def check_unpickling(folder: Path, marker: Marker) -> None:
    """Unpickle every .pt file of a checkpoint with `safe_load` before any rank loads it.

    Files in torch's zip format are memory-mapped, so this reads the pickles, not the tensors.
    The engine's own loads are weights-only as well; checking here first makes every rank refuse
    together (rank 0 decides) instead of one rank failing inside DeepSpeed while the others wait.
    FileFormatError for a refused global; Incomplete for a file torch cannot read.
    """
    for name in sorted(marker.files):
        if not name.endswith(".pt"):
            continue
        path = folder / name
        try:
            safe_load(path, map_location="cpu", mmap=zipfile.is_zipfile(path))
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise Incomplete(f"{name} cannot be read ({first_line(err)})") from None


@functools.cache
def _weights_only_engine_class():
    """deepspeed's TorchCheckpointEngine with `load` through `safe_load` (deepspeed imports lazily)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    return WeightsOnlyCheckpointEngine


def safe_checkpoint_engine(engine):
    """A weights-only copy of the engine's checkpoint engine, to assign to `engine.checkpoint_engine`.

    deepspeed's TorchCheckpointEngine.load unpickles with weights_only=False, and every file
    `engine.load_checkpoint` reads goes through `engine.checkpoint_engine.load` (model and optimizer
    states, runtime/engine.py and runtime/state_dict_factory.py). The direct torch.load calls
    elsewhere in deepspeed (zero/stage3.py, checkpoint/*, utils/zero_to_fp32.py) serve universal
    checkpoints ("checkpoint": {"load_universal": true}), loads without optimizer state and the
    offline converters, none of which this trainer uses; universal loading and the other checkpoint
    engines (writer, datastates: they save differently and load with other settings) are refused.
    The copy keeps the settings DeepSpeed read from the config (zip serialization).
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise ConfigError(f"--deepspeed_config: checkpoint engine {type(current).__name__} is not supported; "
                          "remove checkpoint.writer and datastates (resume loads through torch's weights-only loader)")
    if engine.load_universal_checkpoint():
        raise ConfigError("--deepspeed_config: checkpoint.load_universal is not supported "
                          "(its loaders unpickle arbitrary objects)")
    cls = _weights_only_engine_class()
    safe = cls.__new__(cls)
    safe.__dict__.update(vars(current))
    return safe


# ------------------------------------------------------------------------------------------ per-rank state


def write_rank_state(folder: Path, rank: int, state: dict[str, int], snapshots: dict[str, dict]) -> None:
    """What the trainer itself needs back from this rank (atomically: a kill leaves no half file):
    its position, and each named parameter snapshot's state (EMA, RL's start policy)."""
    with atomic_write(folder / state_file(rank)) as tmp:
        tmp.write_text(json.dumps(state))
    for name, snapshot in snapshots.items():
        with atomic_write(folder / snapshot_file(name, rank)) as tmp:
            torch.save(snapshot, tmp)


def read_rank_state(folder: Path, rank: int) -> dict[str, int]:
    """This rank's `trainer_rank{r}.json` (checked complete by the marker before)."""
    state = json.loads((folder / state_file(rank)).read_text())
    for key in ("step", "epoch", "position", "skipped_batches"):
        if type(state.get(key)) is not int:
            raise FileFormatError(f"{folder / state_file(rank)}: {key} is not an integer")
    return state


# ------------------------------------------------------------------------------------------ which checkpoint


@dataclass(frozen=True)
class ResumeChoice:
    """The checkpoint a run continues from (tag None: start fresh), and the newer folders passed over."""

    tag: str | None
    marker: Marker | None = None
    skipped: tuple[tuple[str, str], ...] = ()


def complete_tags(ckpt_dir: Path) -> list[str]:
    """The complete checkpoints (marker and file sizes), oldest first: what an error message offers."""
    tags = []
    for folder in reversed(step_folders(ckpt_dir)):
        try:
            check_files(folder)
            tags.append(folder.name)
        except Incomplete:
            continue
    return tags


def check_rank_files(marker: Marker) -> None:
    """Every rank of the writing run left its trainer state (a marker lists what was there)."""
    for rank in range(marker.world_size):
        if state_file(rank) not in marker.files:
            raise Incomplete(f"{state_file(rank)} is not listed in {MARKER}")


# What each parameter snapshot a run keeps is, for the message when a checkpoint lacks it.
SNAPSHOT_REASONS = {
    "ema": "its run had no --ema-decay; resume it without --ema-decay or start a new --output",
    "start_policy": "its run had no --kl-weight; resume it without --kl-weight or start a new --output",
}


def check_compatible(tag: str, marker: Marker, world_size: int, snapshots: tuple[str, ...] = ()) -> None:
    """A complete checkpoint this run can continue: same world size, and every parameter snapshot
    this run keeps (EMA, RL's start policy) saved by every rank."""
    check_world_size(tag, marker, world_size)
    for name in snapshots:
        if any(snapshot_file(name, r) not in marker.files for r in range(marker.world_size)):
            raise FileFormatError(f"checkpoint {tag} has no {name} state ({SNAPSHOT_REASONS.get(name, 'its run kept none')})")


def check_world_size(tag: str, marker: Marker, world_size: int) -> None:
    """ZeRO partitions optimizer state per rank, so a checkpoint resumes on its own world size only."""
    if marker.world_size != world_size:
        raise ConfigError(f"checkpoint {tag} was written by {marker.world_size} ranks and this run has {world_size}; "
                          f"relaunch with {marker.world_size} ranks or start a new --output")


def choose_checkpoint(ckpt_dir: Path, resume: str, world_size: int, snapshots: tuple[str, ...] = ()) -> ResumeChoice:
    """The checkpoint `--resume auto|TAG` means (call on rank 0; `Trainer` broadcasts the result).

    auto: the newest complete folder, walking back past unfinished or damaged ones (they are
    returned in `skipped` with the reason); none: start fresh. The newest complete checkpoint of
    another world size (or without a parameter snapshot this run keeps) is an error rather than something
    to walk past: resuming an older one, or starting over, would silently drop the newest progress. TAG: that checkpoint, or a FileFormatError / ConfigError
    naming what is wrong and the complete tags there are. A pickle that needs a global other than
    DeepSpeed's is a FileFormatError in both modes.
    """
    if resume == "auto":
        skipped = []
        for folder in step_folders(ckpt_dir):
            try:
                marker = check_files(folder)
                check_rank_files(marker)
                check_unpickling(folder, marker)
            except Incomplete as why:
                skipped.append((folder.name, str(why)))
                continue
            check_compatible(folder.name, marker, world_size, snapshots)
            return ResumeChoice(folder.name, marker, tuple(skipped))
        return ResumeChoice(None, None, tuple(skipped))
    tag = resume
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag:
        raise ConfigError(f"--resume {tag!r}: use auto or the name of a folder in {ckpt_dir}")
    available = ", ".join(complete_tags(ckpt_dir)) or "none"
    folder = ckpt_dir / tag
    if not folder.is_dir():
        raise FileFormatError(f"--resume {tag}: no such checkpoint in {ckpt_dir}; complete checkpoints: {available}")
    try:
        marker = check_files(folder)
        check_rank_files(marker)
        check_unpickling(folder, marker)
    except Incomplete as why:
        raise FileFormatError(f"--resume {tag}: the checkpoint is incomplete ({why}); "
                              f"complete checkpoints: {available}") from None
    check_compatible(tag, marker, world_size, snapshots)
    return ResumeChoice(tag, marker, ())
