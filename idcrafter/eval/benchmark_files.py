"""The published OpenS2V-Eval benchmark files, read as published (OpenS2V-Nexus, Sec. 4: OpenS2V-Eval).

The benchmark ships three JSON files, `Open-Domain_Eval.json` (180 cases), `Human-Domain_Eval.json`
(60) and `SingleObject_Eval.json` (30; the leaderboard's Single-Domain), each one object mapping a case
id to its case::

    {"humanobj_1": {"img_paths": ["Images/humanobj/human/man/celebrity/1.jpg", ...],
                    "prompt": "The video ...", "synthesis_flag": "Wrong", "class_label": ["Man", "Bird", "Park"]}}

`img_paths` are relative to the benchmark's data folder (the `OpenS2V-Eval` dataset root, our
`--images-root`); `class_label` names one category per image. A model's video for a case is
`<id>.mp4`: the benchmark's scripts find the case of a video by its file name. `synthesis_flag` is
carried as given (the files spell it "wrong", "Wrong" and "True"); keys the format may add later are
ignored.

Library code: problems raise `FileFormatError` (a bad file, a missing image or video) or
`ConfigError` (an unknown case id, a bad limit), one line naming the file, the case and the problem.
Nothing here imports torch or a generator.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from idcrafter.utils.errors import ConfigError, FileFormatError

__all__ = [
    "BENCHMARK_FILES",
    "FACE_FOLDERS",
    "BenchmarkCase",
    "case_jobs",
    "check_images",
    "find_videos",
    "read_benchmark",
    "select_cases",
    "write_stand_in_images",
]

# The published file names and the leaderboard domain each one is scored as.
BENCHMARK_FILES = {
    "Open-Domain_Eval.json": "open",
    "Human-Domain_Eval.json": "human",
    "SingleObject_Eval.json": "single",
}
# The benchmark's FaceSim takes a case's first reference whose path lies in one of these folders
# (OpenS2V-Nexus eval/get_facesim.py, the face reference of a case).
FACE_FOLDERS = ("/man/", "/woman/", "/crop_man/", "/crop_woman/")
VIDEO_SUFFIX = ".mp4"  # the benchmark's scripts list `*.mp4` only


@dataclass(frozen=True)
class BenchmarkCase:
    """One case of a benchmark file; `img_paths` and `class_label` have the same length (>= 1)."""

    id: str
    prompt: str
    img_paths: tuple[str, ...]
    class_label: tuple[str, ...]
    synthesis_flag: str | None = None

    def images(self, root: str | os.PathLike) -> tuple[Path, ...]:
        """The reference images under the benchmark's data folder `root`, in file order."""
        return tuple(Path(root) / p for p in self.img_paths)

    def face_reference(self) -> str | None:
        """The image the benchmark's FaceSim compares faces with (the first in a face folder), or None."""
        return next((p for p in self.img_paths if any(f in p for f in FACE_FOLDERS)), None)


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _id_problem(case_id: str) -> str | None:
    """Why a case id cannot name an output file `<id>.mp4` in one folder, or None."""
    if not case_id.strip():
        return "an empty case id"
    if "/" in case_id or "\\" in case_id or "\x00" in case_id or case_id.startswith("."):
        return f"case id {case_id!r} cannot be a file name (a path separator, NUL or a leading dot)"
    return None


def _path_problem(path) -> str | None:
    """Why an `img_paths` entry is not a relative path inside the data folder, or None."""
    if not isinstance(path, str) or not path.strip():
        return f"an img_paths entry must be a non-empty string, got {json.dumps(path)[:60]}"
    pure = PurePosixPath(path.replace("\\", "/"))
    if pure.is_absolute() or os.path.isabs(path) or ".." in pure.parts:
        return f"img_paths entry {path!r} must be relative to the images root, inside it"
    return None


def _case_problems(record) -> list[str]:
    """Every problem of one decoded case (the value under its id)."""
    if not isinstance(record, Mapping):
        return [f"must be a JSON object, got {_type_name(record)}"]
    problems = []
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append("'prompt' must be a non-empty string" + ("" if "prompt" in record else " (missing)"))
    paths, labels = record.get("img_paths"), record.get("class_label")
    if not isinstance(paths, list) or not paths:
        problems.append(f"'img_paths' must be a non-empty list, got {json.dumps(paths)[:60]}")
    else:
        problems += [p for p in map(_path_problem, paths) if p]
    if not isinstance(labels, list) or not all(isinstance(c, str) and c.strip() for c in labels):
        problems.append(f"'class_label' must be a list of names, got {json.dumps(labels)[:60]}")
    elif isinstance(paths, list) and len(labels) != len(paths):
        problems.append(f"{len(labels)} class_label for {len(paths)} img_paths")
    flag = record.get("synthesis_flag")
    if flag is not None and not isinstance(flag, str):
        problems.append(f"'synthesis_flag' must be a string, got {_type_name(flag)}")
    return problems


def read_benchmark(path: str | os.PathLike) -> list[BenchmarkCase]:
    """A published benchmark file -> its cases in file order.

    FileFormatError (one line: the file, the first bad case and its problem, and how many more) when
    the file is missing, is not JSON, is not an object of cases, or a case is malformed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such benchmark file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise FileFormatError(f"{path}: cannot read it ({err.__class__.__name__}: {err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{path}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise FileFormatError(f"{path}: a benchmark file is a JSON object of cases by id, got {_type_name(data)}")
    if not data:
        raise FileFormatError(f"{path}: no cases")
    problems = []
    cases = []
    for case_id, record in data.items():
        found = [p for p in (_id_problem(case_id),) if p] or _case_problems(record)
        if found:
            problems.append(f"case {case_id!r}: {'; '.join(found)}")
            continue
        cases.append(BenchmarkCase(
            id=case_id, prompt=record["prompt"], img_paths=tuple(record["img_paths"]),
            class_label=tuple(record["class_label"]), synthesis_flag=record.get("synthesis_flag"),
        ))
    if problems:
        more = f" (and {len(problems) - 1} more bad cases)" if len(problems) > 1 else ""
        raise FileFormatError(f"{path}: {problems[0]}{more}")
    return cases


def select_cases(
    cases: Sequence[BenchmarkCase], source: str | os.PathLike, ids: Iterable[str] | None = None,
    limit: int | None = None,
) -> list[BenchmarkCase]:
    """The cases named by `ids` (in the order given) or all of them, then the first `limit`.

    ConfigError naming `source` (the file) for ids it does not hold, repeated ids, or a limit < 1.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"{source}: the case limit must be >= 1, got {limit}")
    if ids is None:
        chosen = list(cases)
    else:
        ids = list(ids)
        by_id = {case.id: case for case in cases}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise ConfigError(f"{source}: no case {shown} in the file ({len(cases)} cases, e.g. "
                              f"{', '.join(c.id for c in cases[:3])})")
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ConfigError(f"{source}: case {', '.join(repeated)} named more than once")
        chosen = [by_id[i] for i in ids]
    return chosen[:limit] if limit is not None else chosen


def check_images(cases: Sequence[BenchmarkCase], images_root: str | os.PathLike, source: str | os.PathLike) -> None:
    """Every reference image of `cases` is a file under `images_root`; FileFormatError otherwise,
    naming the file, the first case with a missing image, the image, and how many are missing."""
    from idcrafter.utils.cli import path_problem  # pure path checks, no InputError raised

    root = Path(images_root)
    problem = path_problem(root, "folder")
    if problem:
        raise FileFormatError(f"images root {root} {problem}")
    missing = [(case, rel, why) for case in cases for rel in case.img_paths
               if (why := path_problem(root / rel, "file"))]
    if missing:
        case, rel, why = missing[0]
        more = f" ({len(missing)} images missing)" if len(missing) > 1 else ""
        raise FileFormatError(f"{source}: case {case.id}: image {rel} {why} under {root}{more}")


def find_videos(cases: Sequence[BenchmarkCase], folder: str | os.PathLike, source: str | os.PathLike) -> list[Path]:
    """`folder/<id>.mp4` for each case, in case order; FileFormatError naming the missing ones."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileFormatError(f"videos folder {folder} does not exist or is not a folder")
    paths = [folder / f"{case.id}{VIDEO_SUFFIX}" for case in cases]
    missing = [case.id for case, p in zip(cases, paths) if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileFormatError(f"{folder}: no <id>{VIDEO_SUFFIX} for {len(missing)} of {len(cases)} cases of "
                              f"{source}: {shown}")
    return paths


def case_jobs(cases: Sequence[BenchmarkCase], images_root: str | os.PathLike, seed: int = 0, **job_fields):
    """Render jobs (`idcrafter.render.Job`) for `cases`: `<id>.mp4`, the case's prompt, its images as
    references and its class labels as categories. `job_fields` (size, frames, steps, ...) apply to all.

    Call `check_images` first: the jobs refer to the images by absolute path.
    """
    from idcrafter.render import Job

    root = Path(os.path.abspath(images_root))
    return [
        Job(prompt=case.prompt, refs=case.images(root), output=f"{case.id}{VIDEO_SUFFIX}", line=number,
            seed=seed, mode="video", categories=case.class_label, **job_fields)
        for number, case in enumerate(cases, start=1)
    ]


def write_stand_in_images(cases: Sequence[BenchmarkCase], images_root: str | os.PathLike) -> int:
    """Fill `images_root` with real photos shipped in installed packages at the cases' `img_paths`,
    for demos and tests without the benchmark's data: face-folder images get insightface's sample
    portraits, the others scikit-image's photos, in turn. Existing files are kept. Returns how many
    were written.
    """
    import insightface
    import numpy as np
    import skimage.data
    from PIL import Image

    faces_dir = Path(insightface.__file__).parent / "data" / "images"
    faces = [np.asarray(Image.open(faces_dir / name).convert("RGB")) for name in ("Tom_Hanks_54745.png", "t1.jpg")]
    others = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    written, used = 0, {"faces": 0, "others": 0}  # each kind takes its photos in turn
    for case in cases:
        for rel in case.img_paths:
            target = Path(images_root) / rel
            if target.exists():
                continue
            kind = "faces" if any(f in rel for f in FACE_FOLDERS) else "others"
            pool = faces if kind == "faces" else others
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pool[used[kind] % len(pool)]).save(target)
            used[kind] += 1
            written += 1
    return written
