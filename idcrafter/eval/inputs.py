"""What an evaluation reads: the benchmark manifest, the generated files, metric names and options.

Everything here raises `InputError` with one line naming the bad input, before any model loads.
Generated files are matched to manifest samples by id (`<id>.mp4`, other video suffixes, or
`<id>.png` / `.jpg` / ...), or given as a list in manifest order. An optional `<id>.npz` next
to a generated file holds the attention shares for the Leakage column (see `attention_leakage`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from idcrafter.eval.metrics import BUILTIN_METRICS, REWARD_METRICS, SKIP_ERRORS, EvalItem, one_line
from idcrafter.rewards.base import RewardModel, build_reward
from idcrafter.utils.cli import InputError, user_file

__all__ = [
    "IMAGE_SUFFIXES",
    "KNOWN",
    "build_rewards",
    "find_generated",
    "load_benchmark_items",
    "load_items",
    "parse_metrics",
    "parse_model_options",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
KNOWN = (*REWARD_METRICS, *BUILTIN_METRICS)


def parse_metrics(spec: str | Sequence[str] | None, known: Sequence[str] = KNOWN) -> list[str]:
    """"face,motion" (or a list; None: every known metric) -> names; InputError for unknown ones."""
    if spec is None:
        return list(known)
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise InputError("--metrics: no metric named")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"--metrics: unknown metric {', '.join(unknown)}; known: {', '.join(known)}")
    return list(dict.fromkeys(names))


def _option_value(text: str) -> object:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_model_options(specs: Sequence[str], known: Sequence[str] = REWARD_METRICS) -> dict[str, dict[str, object]]:
    """["clip_text.path=/models/clip", "face.backend=dlib"] -> {"clip_text": {"path": ...}, "face": {...}}.

    Numbers and true/false become int / float / bool; everything else stays a string.
    """
    options: dict[str, dict[str, object]] = {}
    for spec in specs:
        target, sep, value = spec.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot or not name.strip() or not key.strip():
            raise InputError(f"--model-option {spec!r}: expected NAME.KEY=VALUE, e.g. clip_text.path=/models/clip")
        name, key = name.strip(), key.strip()
        if name not in known:
            raise InputError(f"--model-option {spec!r}: unknown reward {name!r}; known: {', '.join(known)}")
        options.setdefault(name, {})[key] = _option_value(value.strip())
    return options


def build_rewards(
    names: Sequence[str], options: Mapping[str, Mapping[str, object]], device: str = "cpu"
) -> tuple[dict[str, RewardModel], dict[str, str]]:
    """Reward models by name (`build_reward(name, device=..., **options[name])`), and, for those that
    cannot be built (no model path given, a missing package, a bad option), the one-line reason.

    The scorers never download: without a path they raise a ValueError naming the option to pass.
    """
    rewards: dict[str, RewardModel] = {}
    skipped: dict[str, str] = {}
    for name in names:
        opts = {"device": device, **options.get(name, {})}
        try:
            rewards[name] = build_reward(name, **opts)
        except (*SKIP_ERRORS, TypeError) as err:  # TypeError: an option the scorer does not take
            skipped[name] = one_line(err)
    return rewards, skipped


def _load_ref(path: Path) -> np.ndarray:
    from idcrafter.utils.media import load_image, to_rgb

    return np.asarray(to_rgb(load_image(path)))


def _load_benchmark_ref(path: Path) -> np.ndarray:
    """A benchmark image read as OpenS2V-Eval's scripts read it: `Image.open(path).convert("RGB")`, so no
    EXIF turn and, for a transparent PNG, the colour under the alpha as stored (PIL drops the alpha; our
    own loaders composite on white). The file is first checked by `load_image` (one-line error)."""
    from PIL import Image

    from idcrafter.utils.media import load_image

    load_image(path)
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def find_generated(folder: Path, sample_id: str) -> Path | None:
    """folder/<id>.<video or image suffix>, videos first; None when there is none."""
    for suffix in (*VIDEO_SUFFIXES, *IMAGE_SUFFIXES):
        for candidate in (folder / f"{sample_id}{suffix}", folder / f"{sample_id}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def load_items(manifest: str | Path, generated: Sequence[str | Path]) -> list[EvalItem]:
    """Benchmark samples and their generated files -> `EvalItem`s (references loaded, media probed).

    Args:
        manifest: the benchmark JSONL (docs/design.md 8); its own `video` / `image` need not exist.
        generated: one folder (files named `<id>.mp4` / `<id>.png`, ...) or one file per sample,
            in manifest order.
    """
    from idcrafter.data.manifest import load_manifest
    from idcrafter.data.video import media_size

    manifest = Path(manifest)
    samples, errors = load_manifest(manifest, check_files=False)
    if errors:
        more = f" (and {len(errors) - 1} more bad lines)" if len(errors) > 1 else ""
        raise InputError(f"manifest {manifest}: {errors[0]}{more}")
    if not samples:
        raise InputError(f"manifest {manifest}: no samples")
    if not generated:
        raise InputError("no generated files given (--videos FOLDER or --videos A.mp4 B.mp4 ...)")
    paths = [Path(p) for p in generated]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        found = [find_generated(folder, s.id) for s in samples]
        missing = [s.id for s, p in zip(samples, found) if p is None]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise InputError(f"--videos {folder}: no <id>.mp4 or <id>.png for {len(missing)} of {len(samples)} "
                             f"samples of {manifest}: {shown}")
        paths = found
    elif len(paths) != len(samples):
        given = f"{len(paths)} file{'s' if len(paths) != 1 else ''}"
        raise InputError(f"--videos: {given} given but manifest {manifest} has {len(samples)} prompts")
    items = []
    for sample, path in zip(samples, paths):
        if path.is_dir():
            raise InputError(f"--videos {path}: a folder among files (give one folder, or one file per sample)")
        if path.suffix.lower() not in (*VIDEO_SUFFIXES, *IMAGE_SUFFIXES):
            raise InputError(f"--videos {path}: not a video or image file (suffix {path.suffix or 'none'})")
        with user_file("--videos"):
            media_size(path, is_video=path.suffix.lower() in VIDEO_SUFFIXES)  # exists and opens, before any model loads
        with user_file("--data"):  # the references the manifest names
            refs = [_load_ref(s.image) for s in sample.subjects]
        attention = path.with_suffix(".npz")
        items.append(EvalItem(id=sample.id, prompt=sample.prompt, refs=refs, categories=[s.category for s in sample.subjects],
                              path=path, attention=attention if attention.is_file() else None,
                              ref_paths=[str(s.image) for s in sample.subjects],
                              descriptors=[s.descriptor for s in sample.subjects]))
    return items



def load_benchmark_items(
    benchmark: str | Path, images_root: str | Path, videos: str | Path,
    cases: Sequence[str] | None = None, limit: int | None = None,
) -> list[EvalItem]:
    """A published OpenS2V-Eval file's cases and their videos (`videos/<id>.mp4`) -> `EvalItem`s.

    The case's prompt, its `img_paths` under `images_root` as references and its `class_label` as
    categories, as the benchmark's scripts pair them. Every case id, image and video is checked
    before anything is decoded for scoring.
    """
    from idcrafter.data.video import media_size
    from idcrafter.eval.benchmark_files import check_images, find_videos, read_benchmark, select_cases

    with user_file("--opens2v"):
        chosen = select_cases(read_benchmark(benchmark), benchmark, cases, limit)
    with user_file("--images-root"):
        check_images(chosen, images_root, benchmark)
    with user_file("--videos"):
        paths = find_videos(chosen, videos, benchmark)
        for path in paths:
            media_size(path, is_video=True)  # exists and opens, before any model loads
    with user_file("--images-root"):
        return [EvalItem(id=case.id, prompt=case.prompt, refs=[_load_benchmark_ref(p) for p in case.images(images_root)],
                         categories=list(case.class_label), path=path,
                         attention=path.with_suffix(".npz") if path.with_suffix(".npz").is_file() else None,
                         ref_paths=list(case.img_paths))
                for case, path in zip(chosen, paths)]
