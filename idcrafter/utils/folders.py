"""Checks of model and adapter folders before anything loads them: every part present, every
weights file whole. Reading a safetensors header costs a few kilobytes, so a 30 GB model folder is
checked in milliseconds, and a truncated download or a half-copied adapter is named in one line
instead of failing deep inside a loader (or, worse, after a full generation).

Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from idcrafter.utils.cli import InputError, check_input_dir, path_problem

__all__ = ["check_adapter_folder", "check_model_folder", "check_safetensors", "read_json_object"]

# safetensors headers are JSON of at most 100 MB (the format's own limit).
_MAX_HEADER = 100 * 1024 * 1024
# Components a diffusers folder may list that hold no weights.
_NO_WEIGHTS = ("tokenizer", "scheduler", "feature_extractor", "image_processor", "processor")


def check_safetensors(path: str | os.PathLike, what: str) -> None:
    """InputError unless `path` is a whole safetensors file: a readable header whose tensors end
    exactly where the file does (a truncated or padded file, or another format, fails)."""
    path = Path(path)
    problem = path_problem(path)
    if problem:
        raise InputError(f"{what}: {path} {problem}")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than a header")
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER, size - 8):
                raise ValueError("the header length is larger than the file")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, stop = entry["data_offsets"]
            if not 0 <= start <= stop:
                raise ValueError(f"tensor {name!r} has offsets {start}..{stop}")
            end = max(end, stop)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise InputError(f"{what}: {path} is not a readable safetensors file ({err})") from None
    if 8 + length + end != size:
        state = "truncated" if size < 8 + length + end else "longer than its header says"
        raise InputError(f"{what}: {path} is {state} ({size} bytes, the header needs {8 + length + end})")


def _check_weights(folder: Path, what: str) -> int:
    """Check every safetensors file and sharded index in `folder` (not recursive); return how many
    weights files there are (.safetensors or .bin)."""
    count = 0
    for index in sorted(folder.glob("*.safetensors.index.json")):
        data = read_json_object(index, what)
        shards = sorted(set((data.get("weight_map") or {}).values())) if isinstance(data.get("weight_map"), dict) else []
        if not shards:
            raise InputError(f"{what}: {index} has no weight_map")
        for shard in shards:
            if path_problem(folder / shard):
                raise InputError(f"{what}: shard {shard} listed in {index.name} {path_problem(folder / shard)}")
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights, what)
        count += 1
    return count + len(list(folder.glob("*.bin")))


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """A JSON file that must hold an object; InputError naming `what` and the file otherwise."""
    path = Path(path)
    problem = path_problem(path)
    if problem:
        raise InputError(f"{what}: {path} {problem}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{what}: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise InputError(f"{what}: {path} must hold a JSON object, not {type(data).__name__}")
    return data


def check_model_folder(folder: str | os.PathLike, what: str, required: Iterable[str] = ("transformer",)) -> dict:
    """A diffusers pipeline folder whose parts are all there and whole; returns model_index.json.

    Every component model_index.json names (and every name in `required`) must be a folder; a
    model component must hold its config.json and weights, each safetensors file whole.
    """
    folder = check_input_dir(folder, what)
    index_path = folder / "model_index.json"
    index = read_json_object(index_path, what) if index_path.exists() else {}
    named = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None]
    for name in dict.fromkeys([*required, *named]):
        part = folder / name
        problem = path_problem(part, "folder")
        if problem and name == "transformer":
            raise InputError(f"{what} {folder}: not a Wan or FLUX diffusers folder (transformer/ {problem})")
        if problem:
            source = "its model_index.json lists" if name in named else "the model needs"
            raise InputError(f"{what} {folder}: {source} {name!r}, but {name}/ {problem}")
        if name.rstrip("_0123456789") in _NO_WEIGHTS:
            continue
        if (part / "config.json").exists() or name in required:
            read_json_object(part / "config.json", f"{what} {name}")
            if _check_weights(part, f"{what} {name}") == 0:
                raise InputError(f"{what} {folder}: {name}/ holds no weights (.safetensors or .bin)")
    return index


def check_adapter_folder(folder: str | os.PathLike, what: str, config_name: str) -> dict:
    """An adapter folder: its JSON config (returned, parsed) and every safetensors file in it and in
    its subfolders whole. The config's field types are checked by the branch's config class."""
    folder = check_input_dir(folder, what)
    if path_problem(folder / config_name):
        raise InputError(f"{what} {folder}: no {config_name} in that folder (not an adapter)")
    data = read_json_object(folder / config_name, what)
    for sub in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        _check_weights(sub, what)
    return data
