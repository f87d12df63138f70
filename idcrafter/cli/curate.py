"""Curate raw videos into training manifests with references, masks and prompts (docs/design.md 8.1).

    python scripts/curate.py raw_videos/ --out curated/ --preset idcrafter-video \\
        --detector-model models/grounding-dino-base --segmenter-model models/sam-vit-huge \\
        --verifier-model models/dinov2-base --captioner-model models/Qwen2.5-VL-7B-Instruct --device cuda
    python scripts/curate.py toy_raw/ --out toy_curated/ --preset idcrafter-video --backend toyworld
    torchrun --nproc_per_node 8 scripts/curate.py raw/ --out curated/ ...   # or --shard i/n, SLURM arrays

Inputs are folders (every video below), glob patterns, list files (.txt, one path a line) or
videos. Presets: idcrafter-video (multi-subject clips, mask videos), multicrafter-image (two or
more people, target frame + references from another frame, body and face masks), one-for-all
(single-subject pairs: face, upper, lower, bag). `--settings FILE` (YAML / JSON) edits the preset
(stages and their options, backends, categories, write options; see idcrafter/curate/presets.py);
the resolved settings are saved as OUT/settings.json. `--backend toyworld` runs the toy world's
detector, segmenter, verifier and captioner (no model files).

Writes OUT/manifest.jsonl (train with it), videos|images/, masks/, refs/, OUT/report.json (the
per-stage funnel: in, kept, dropped by reason, throughput; every drop) and OUT/funnel.png.
Finished inputs are skipped on a rerun; a bad video is a reported drop and never stops the run.
Bad flags or settings are one line `error: ...` and exit code 2, before any model loads.
"""

from __future__ import annotations

import argparse
import os

from idcrafter.utils.cli import (
    ArgumentParser,
    InputError,
    check_device,
    check_input_dir,
    check_input_file,
    check_output_dir,
    fail,
    integer,
)
from idcrafter.utils.settings_file import add_config_argument, parse_command_line

# --*-model flags -> (backend kind, option)
MODEL_FLAGS = {
    "detector_model": ("detector", "model"),
    "segmenter_model": ("segmenter", "model"),
    "sam2_model": ("segmenter", "video_model"),
    "verifier_model": ("verifier", "model"),
    "captioner_model": ("captioner", "model"),
}
# The stage that uses each backend kind: a backend whose stage is not run needs no model.
_STAGE_OF = {"detector": "detect", "segmenter": "segment", "verifier": "verify", "captioner": "caption"}
# Backends that run without a model folder (toy world, templates, face libraries with shipped weights).
_NO_MODEL = {"toyworld", "template", "face"}


def parser() -> ArgumentParser:
    from idcrafter.curate.presets import BACKEND_SETTINGS, PRESETS

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="folders, glob patterns, list files (.txt) or videos")
    p.add_argument("--out", required=True, help="output folder (manifest.jsonl, media, report.json)")
    p.add_argument("--preset", default="idcrafter-video", choices=sorted(PRESETS), help="default: idcrafter-video")
    p.add_argument("--backend", default=None, choices=sorted(BACKEND_SETTINGS),
                   help="toyworld: the toy world's detector, segmenter, verifier and captioner")
    p.add_argument("--settings", default=None, metavar="FILE", help="YAML/JSON edits of the preset (stages, backends, ...)")
    p.add_argument("--detector-model", default=None, help="Grounding-DINO folder (transformers)")
    p.add_argument("--segmenter-model", default=None, help="SAM folder (transformers)")
    p.add_argument("--sam2-model", default=None, help="SAM 2 folder for video mask propagation (optional)")
    p.add_argument("--verifier-model", default=None, help="DINOv2 folder (the dinov2 verifier)")
    p.add_argument("--captioner-model", default=None, help="Qwen2.5-VL folder")
    p.add_argument("--keypoints-model", default=None, help="ViTPose folder for the keypoints stage (multicrafter-image)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK under a launcher with GPUs, else cpu)")
    p.add_argument("--shard", default=None, metavar="I/N", help="curate shard I of N (default: from RANK/WORLD_SIZE or SLURM)")
    p.add_argument("--group", type=integer(1), default=1, metavar="N",
                   help="inputs that go through the stages together (model stages batch across them); default 1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed passes it
    add_config_argument(p)
    return p


def resolve(args: argparse.Namespace) -> dict:
    """The run's settings from the flags; InputError for a bad settings file, key or model folder."""
    from idcrafter.curate.presets import load_settings_file, resolve_settings

    try:
        if args.settings:
            check_input_file(args.settings, "--settings")
        overrides = load_settings_file(args.settings) if args.settings else {}
        settings = resolve_settings(args.preset, args.backend, overrides)
    except ValueError as err:
        raise InputError(f"--settings: {err}" if args.settings else str(err)) from None
    for dest, (kind, option) in MODEL_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            settings["backends"].setdefault(kind, {})[option] = check_input_dir(value, f"--{dest.replace('_', '-')}").as_posix()
    if args.keypoints_model is not None:
        path = check_input_dir(args.keypoints_model, "--keypoints-model").as_posix()
        stage = next((s for s in settings["stages"] if s["name"] == "keypoints"), None)
        if stage is None:
            raise InputError(f"--keypoints-model: the {args.preset} run has no keypoints stage (add it with --settings)")
        stage["options"]["model"] = path
    run = {s["name"] for s in settings["stages"]}
    for kind, stage in _STAGE_OF.items():
        spec = settings["backends"].get(kind, {})
        if stage in run and spec.get("name") not in _NO_MODEL and not spec.get("model"):
            flag = next(f"--{d.replace('_', '-')}" for d, (k, o) in MODEL_FLAGS.items() if k == kind and o == "model")
            raise InputError(f"the {stage} stage's {spec.get('name')} {kind} needs a local model folder: {flag} DIR "
                             f"(or backends.{kind}.model in --settings), or --backend toyworld")
    return settings


def main(argv=None) -> int:
    args = parse_command_line(parser(), argv)
    from idcrafter.curate.presets import save_settings
    from idcrafter.curate.runner import Curator, list_inputs, parse_shard, shard_from_env

    try:
        settings = resolve(args)
        try:
            shard = parse_shard(args.shard) if args.shard else shard_from_env()
        except ValueError as err:
            raise InputError(f"--shard: {err}" if args.shard else f"launcher variables: {err}") from None
        device = args.device
        if device is None:  # under a launcher with GPUs, each rank on its own (torch only imported then)
            local = os.environ.get("LOCAL_RANK")
            device = "cpu"
            if local is not None:
                import torch

                device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        device = check_device(device)
        try:
            inputs = list_inputs(args.inputs)
        except ValueError as err:
            raise InputError(str(err)) from None
        out = check_output_dir(args.out, "--out")
        try:
            curator = Curator(settings, device=device, group=args.group)  # builds every stage and backend; models load later
        except (ValueError, TypeError) as err:
            raise InputError(f"settings: {err}") from None
    except InputError as err:
        return fail(str(err))
    from idcrafter.utils.logging import setup_logging

    setup_logging()
    out.mkdir(parents=True, exist_ok=True)
    save_settings(settings, out)
    summary = curator.run(inputs, out, shard=shard, progress=not args.no_progress)
    print(f"curated {summary['finished']}/{summary['inputs']} inputs -> {summary['samples']} samples in "
          f"{out / 'manifest.jsonl'} (report: {out / 'report.json'})")
    return 1 if summary["manifest_errors"] else 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
