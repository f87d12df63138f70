"""Check a training manifest before a run: `python -m idcrafter.data.validate manifest.jsonl`.

Prints the counts (samples, videos, images, subjects per sample, masks, splits) and every bad
line with its number and reason. Exit code 0 when every line is good, 1 when some lines are bad,
2 when the manifest itself cannot be read.
"""

from __future__ import annotations

import argparse
import sys

from idcrafter.data.manifest import load_manifest, manifest_stats
from idcrafter.utils.cli import InputError, fail

EXIT_BAD_LINES = 1


def _histogram(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idcrafter.data.validate", description=__doc__.split("\n")[0])
    parser.add_argument("manifest", help="JSONL manifest, one sample a line")
    parser.add_argument(
        "--no-check-files", action="store_true", help="do not check that videos, images and masks exist"
    )
    args = parser.parse_args(argv)
    try:
        samples, errors = load_manifest(args.manifest, check_files=not args.no_check_files)
    except InputError as err:
        return fail(str(err))
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
