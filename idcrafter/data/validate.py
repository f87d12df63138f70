"""Check a training manifest before a run: `python -m idcrafter.data.validate manifest.jsonl`.

Prints the counts (samples, videos, images, subjects per sample, masks, splits) and every bad
line with its number and reason. Every file a good line names is also opened the way training
reads it: images and image masks decoded whole (PIL mode and EXIF orientation included), videos
and video masks probed and their first frame decoded; a file that fails makes its line bad
(`--no-decode` skips this, `--no-check-files` skips every file check). Exit code 0 when every
line is good, 1 when some lines are bad, 2 when the manifest cannot be read or holds no sample.
"""

from __future__ import annotations

import sys

from idcrafter.data.manifest import ManifestError, Sample, is_video_path, load_manifest, manifest_stats
from idcrafter.utils.cli import ArgumentParser, InputError, fail
from idcrafter.utils.errors import FileFormatError

EXIT_BAD_LINES = 1


def _histogram(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "-"


def _decode_video_head(path) -> None:
    """Probe the header and decode the first frame; FileFormatError naming the file otherwise."""
    from idcrafter.data.video import probe_video
    from idcrafter.utils.media import read_video

    info = probe_video(path)
    if info.height <= 0 or info.width <= 0:
        raise FileFormatError(f"video {path}: the header gives no frame size")
    read_video(path, num_frames=1)


def decode_problems(sample: Sample) -> list[str]:
    """Why the sample's files cannot be read as training reads them (empty when they can)."""
    from idcrafter.utils.media import load_image, load_rgb

    problems = []
    checks = [(sample.media, "video" if sample.is_video else "image", sample.is_video)]
    for k, subject in enumerate(sample.subjects):
        checks.append((subject.image, f"subjects[{k}].image", False))
        if subject.mask is not None:
            checks.append((subject.mask, f"subjects[{k}].mask", is_video_path(subject.mask)))
    for path, what, is_video in checks:
        try:
            if is_video:
                _decode_video_head(path)
            elif what.endswith(".mask"):
                load_image(path, what)  # masks are grey levels or alpha: any mode the mask reader takes
            else:
                load_rgb(path, what)
        except FileFormatError as err:  # the library's file errors; anything else is a bug
            problems.append(str(err))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m idcrafter.data.validate", description=__doc__.split("\n")[0])
    parser.add_argument("manifest", help="JSONL manifest, one sample a line")
    parser.add_argument(
        "--no-check-files", action="store_true", help="do not check that videos, images and masks exist"
    )
    parser.add_argument("--no-decode", action="store_true", help="check that files exist, do not decode them")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while decoding")
    args = parser.parse_args(argv)
    try:
        samples, errors = load_manifest(args.manifest, check_files=not args.no_check_files)
    except InputError as err:
        return fail(str(err))
    if not samples and not errors:
        return fail(f"{args.manifest}: the manifest holds no samples")
    if not (args.no_check_files or args.no_decode):
        from tqdm.auto import tqdm

        good = []
        for sample in tqdm(samples, desc="decode", unit="sample", disable=args.no_progress, file=sys.stderr):
            problems = decode_problems(sample)
            if problems:
                errors.append(ManifestError(sample.line, "; ".join(problems)))
            else:
                good.append(sample)
        samples = good
        errors.sort(key=lambda e: e.line)
    stats = manifest_stats(samples)
    print(f"{args.manifest}: {stats['samples']} good samples, {len(errors)} bad lines")
    print(f"  videos: {stats['videos']}, images: {stats['images']}")
    print(f"  subjects: {stats['subjects']} (per sample: {_histogram(stats['subjects_per_sample'])})")
    print(f"  with masks: {stats['subjects_with_masks']} subjects in {stats['samples_with_masks']} samples")
    print(f"  categories: {_histogram(stats['categories'])}")
    print(f"  splits: {_histogram(stats['splits'])}")
    for error in errors:
        print(error)
    return EXIT_BAD_LINES if errors else 0


if __name__ == "__main__":
    sys.exit(main())

