"""The training manifest (docs/design.md 8): JSONL, one sample a line, every line validated.

    {"id": "clip-0001", "video": "videos/0001.mp4", "prompt": "a man and his dog on a beach",
     "subjects": [{"image": "refs/0001_man.png", "mask": "masks/0001_man.mp4", "category": "person"},
                  {"image": "refs/0001_dog.png", "category": "dog", "bbox": [10, 40, 200, 300]}],
     "fps": 30, "split": "train"}

A sample has exactly one of `video` or `image` (an image sample is a one-frame clip). Paths are
relative to the manifest's folder (absolute paths are kept). Optional keys: per subject `mask` (an
image, the same mask for every frame, or a video aligned with the sample's video), `bbox`
([x0, y0, x1, y1], kept as metadata), `descriptor` (a phrase naming the subject in the prompt);
per sample `fps` (the source video's frame rate, overriding the container header, which some
files get wrong) and `split`. Unknown keys are errors: a typo such as "maks" must not silently
drop a mask.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idcrafter.utils.cli import InputError, path_problem, user_file
from idcrafter.utils.jsonl import read_jsonl

__all__ = [
    "SAMPLE_KEYS",
    "SUBJECT_KEYS",
    "VIDEO_EXTENSIONS",
    "ManifestError",
    "Sample",
    "Subject",
    "is_video_path",
    "load_manifest",
    "manifest_stats",
    "read_samples",
]

SAMPLE_KEYS = frozenset({"id", "video", "image", "prompt", "subjects", "fps", "split"})
SUBJECT_KEYS = frozenset({"image", "mask", "category", "bbox", "descriptor"})
# A mask (or media) file with one of these suffixes is decoded as a video, anything else as an image.
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})


def is_video_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class Subject:
    """One subject of a sample; paths are absolute."""

    image: Path
    category: str
    mask: Path | None = None
    bbox: tuple[float, float, float, float] | None = None
    descriptor: str | None = None


@dataclass(frozen=True)
class Sample:
    """One manifest line; exactly one of `video` / `image` is set; paths are absolute."""

    id: str
    prompt: str
    subjects: tuple[Subject, ...]
    video: Path | None = None
    image: Path | None = None
    fps: float | None = None
    split: str | None = None
    line: int = 0

    @property
    def media(self) -> Path:
        """The target file: the video, or the image of an image sample."""
        return self.video if self.video is not None else self.image

    @property
    def is_video(self) -> bool:
        return self.video is not None

    @property
    def has_masks(self) -> bool:
        return any(s.mask is not None for s in self.subjects)


@dataclass(frozen=True)
class ManifestError:
    """A bad manifest line: its 1-based number and every reason it was refused."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unknown(keys: Iterable[str], allowed: frozenset[str]) -> str | None:
    extra = sorted(k for k in keys if k not in allowed)
    if not extra:
        return None
    return f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(repr(k) for k in extra)}"


class _LineParser:
    """Collects every problem of one record instead of stopping at the first."""

    def __init__(self, base: Path, check_files: bool):
        self.base = base
        self.check_files = check_files
        self.problems: list[str] = []

    def path(self, value: Any, what: str, required: bool = True) -> Path | None:
        if value is None:
            if required:
                self.problems.append(f"{what} is missing")
            return None
        if not isinstance(value, str) or not value.strip():
            self.problems.append(f"{what} must be a non-empty path string, got {_type_name(value)}")
            return None
        path = Path(os.path.abspath(self.base / value))
        problem = path_problem(path) if self.check_files else None
        if problem:
            self.problems.append(f"{what} {value!r} {problem} ({path})")
        return path

    def text(self, record: dict, key: str, what: str, required: bool) -> str | None:
        value = record.get(key)
        if value is None:
            if required:
                self.problems.append(f"{what} is missing")
            return None
        if not isinstance(value, str):
            self.problems.append(f"{what} must be a string, got {_type_name(value)}")
            return None
        if required and not value.strip():
            self.problems.append(f"{what} is empty")
            return None
        return value

    def bbox(self, value: Any, what: str) -> tuple[float, float, float, float] | None:
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != 4 or not all(_is_number(v) for v in value):
            self.problems.append(f"{what} must be 4 numbers [x0, y0, x1, y1], got {json.dumps(value)}")
            return None
        x0, y0, x1, y1 = (float(v) for v in value)
        if not (x0 < x1 and y0 < y1):
            self.problems.append(f"{what} {json.dumps(value)} needs x0 < x1 and y0 < y1")
            return None
        return x0, y0, x1, y1

    def subject(self, record: Any, k: int) -> Subject | None:
        where = f"subjects[{k}]"
        if not isinstance(record, dict):
            self.problems.append(f"{where} must be an object, got {_type_name(record)}")
            return None
        before = len(self.problems)
        unknown = _unknown(record, SUBJECT_KEYS)
        if unknown:
            self.problems.append(f"{where}: {unknown}")
        image = self.path(record.get("image"), f"{where}.image")
        mask = self.path(record.get("mask"), f"{where}.mask", required=False)
        category = self.text(record, "category", f"{where}.category", required=True)
        descriptor = self.text(record, "descriptor", f"{where}.descriptor", required=False)
        bbox = self.bbox(record.get("bbox"), f"{where}.bbox")
        if len(self.problems) > before:
            return None
        return Subject(image=image, category=category, mask=mask, bbox=bbox, descriptor=descriptor)

    def sample(self, record: Any, line: int) -> Sample | None:
        if not isinstance(record, dict):
            self.problems.append(f"a sample must be a JSON object, got {_type_name(record)}")
            return None
        unknown = _unknown(record, SAMPLE_KEYS)
        if unknown:
            self.problems.append(unknown)
        sample_id = record.get("id")
        if sample_id is None:
            self.problems.append("id is missing")
        elif not isinstance(sample_id, str) or not sample_id.strip():
            self.problems.append(f"id must be a non-empty string, got {json.dumps(sample_id)}")
            sample_id = None
        prompt = self.text(record, "prompt", "prompt", required=True)
        video = image = None
        if ("video" in record) == ("image" in record):
            which = "both" if "video" in record else "neither"
            self.problems.append(f"a sample needs exactly one of 'video' or 'image', got {which}")
        elif "video" in record:
            video = self.path(record["video"], "video")
        else:
            image = self.path(record["image"], "image")
        fps = record.get("fps")
        if fps is not None and not (_is_number(fps) and fps > 0):
            self.problems.append(f"fps must be a positive number, got {json.dumps(fps)}")
        split = self.text(record, "split", "split", required=False)
        subjects = record.get("subjects")
        parsed: list[Subject | None] = []
        if subjects is None:
            self.problems.append("subjects is missing")
        elif not isinstance(subjects, list):
            self.problems.append(f"subjects must be a list, got {_type_name(subjects)}")
        elif not subjects:
            self.problems.append("subjects is empty (a sample needs at least one subject)")
        else:
            parsed = [self.subject(s, k) for k, s in enumerate(subjects)]
        for k, subject in enumerate(parsed):
            # CCPA places a descriptor's own prompt tokens (One-for-All Sec. 3.3): it must be in the prompt.
            if subject is not None and subject.descriptor and prompt and subject.descriptor not in prompt:
                self.problems.append(f"subjects[{k}].descriptor {subject.descriptor!r} does not occur in the prompt")
        if self.problems:
            return None
        return Sample(
            id=sample_id, prompt=prompt, subjects=tuple(parsed), video=video, image=image,
            fps=None if fps is None else float(fps), split=split, line=line,
        )


def load_manifest(path: str | os.PathLike, check_files: bool = True) -> tuple[list[Sample], list[ManifestError]]:
    """Read and validate a JSONL manifest: the good samples, and one `ManifestError` per bad line.

    Every line is checked (not only the first bad one) so one run lists everything to fix. Blank
    lines are skipped. `check_files=False` skips the existence checks (e.g. on a machine without
    the data). A manifest that cannot be read at all raises `InputError`.
    """
    path = Path(path)
    base = Path(os.path.abspath(path.parent))
    samples: list[Sample] = []
    errors: list[ManifestError] = []
    seen: dict[str, int] = {}
    with user_file():  # a manifest that cannot be read at all: the user's file, one line naming it
        lines = list(read_jsonl(path, "manifest"))
    for number, record, problem in lines:
        if problem is not None:
            errors.append(ManifestError(number, problem))
            continue
        parser = _LineParser(base, check_files)
        sample = parser.sample(record, number)
        if sample is not None and sample.id in seen:
            parser.problems.append(f"id {sample.id!r} is already used by line {seen[sample.id]}")
        if parser.problems:
            errors.append(ManifestError(number, "; ".join(parser.problems)))
            continue
        seen[sample.id] = number
        samples.append(sample)
    return samples, errors


def read_samples(path: str | os.PathLike, flag: str = "--data", max_subjects: int | None = None) -> list[Sample]:
    """The samples of a manifest a run trains on: InputError naming `flag`, the count of bad lines
    and the first one (fix the manifest before a long run), saying it holds no sample, or (with
    `max_subjects`) that some samples have more subjects than the model takes."""
    samples, errors = load_manifest(path)
    if errors:
        first = errors[0]
        raise InputError(f"{flag} {path}: {len(errors)} bad lines (line {first.line}: {first.message}); "
                         f"run `python -m idcrafter.data.validate {path}`")
    if not samples:
        raise InputError(f"{flag} {path}: no samples")
    too_many = [s.id for s in samples if max_subjects is not None and len(s.subjects) > max_subjects]
    if too_many:
        raise InputError(f"{flag} {path}: {len(too_many)} samples have more than {max_subjects} subjects "
                         f"(first: {too_many[0]})")
    return samples


def manifest_stats(samples: Iterable[Sample]) -> dict[str, Any]:
    """Counts for a report: samples, videos, images, subjects-per-sample histogram, masks, splits."""
    samples = list(samples)
    subjects = [s for sample in samples for s in sample.subjects]
    return {
        "samples": len(samples),
        "videos": sum(s.is_video for s in samples),
        "images": sum(not s.is_video for s in samples),
        "subjects": len(subjects),
        "subjects_per_sample": dict(sorted(Counter(len(s.subjects) for s in samples).items())),
        "subjects_with_masks": sum(s.mask is not None for s in subjects),
        "samples_with_masks": sum(s.has_masks for s in samples),
        "categories": dict(Counter(s.category for s in subjects).most_common()),
        "splits": dict(sorted(Counter(s.split or "(none)" for s in samples).items())),
    }
