#!/usr/bin/env python
"""Train MultiCrafter or One-for-All (SFT) on FLUX with DeepSpeed, from one CPU to many GPU nodes.

MultiCrafter's progressive recipe (two runs, the second from the first's adapter):

    deepspeed --num_gpus 8 scripts/train_image.py --preset multicrafter --base FLUX.1-dev \\
        --data data/images.jsonl --stage single --lr 3e-5 --max-steps 40000 --output runs/mc_single \\
        --deepspeed_config ds_configs/zero3.json --gradient-checkpointing
    deepspeed --num_gpus 8 scripts/train_image.py --preset multicrafter --base FLUX.1-dev \\
        --adapter runs/mc_single/adapter --data data/images.jsonl --stage multi --lr 1e-5 \\
        --attn-loss-weight 0.3 --output runs/mc_multi --deepspeed_config ds_configs/zero3.json

One-for-All, single-subject pairs, each step giving the subject a random category:

    deepspeed --num_gpus 8 scripts/train_image.py --preset one-for-all --base FLUX.1-Kontext-dev \\
        --data data/pairs.jsonl --stage single --random-categories face upper lower bag --output runs/ofa

The manifest (DESIGN 8) has image samples: {"id", "image", "prompt", "subjects": [{"image",
"mask"?, "category", "descriptor"?}]}. Without --base the preset's components start from random
weights (tests, the toy world). Writes OUTPUT/checkpoints (DeepSpeed, for --resume), OUTPUT/adapter
(for inference; with --trainable all also OUTPUT/adapter/pipeline), OUTPUT/tensorboard,
OUTPUT/metrics.jsonl, OUTPUT/training.png and OUTPUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from idcrafter.utils.cli import InputError, fail, parse_size  # noqa: E402

POLICIES = ("adapter", "lora", "dam", "all")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-multicrafter", help="multicrafter, one-for-all, tiny-*, toyworld-*")
    p.add_argument("--base", default=None, help="FLUX diffusers folder (default: random init of the preset)")
    p.add_argument("--adapter", default=None, help="adapter folder to start from (e.g. the single-subject stage)")
    p.add_argument("--data", required=True, help="JSONL manifest of image samples")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default="ds_configs/zero2.json")
    p.add_argument("--output", required=True, help="run folder")
    p.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint) or a checkpoint tag")
    p.add_argument("--stage", default="all", help="all, single (one-subject samples) or multi (two or more)")
    p.add_argument("--attn-loss-weight", type=float, default=0.0, help="lambda of the IDAR loss (0.3 in MultiCrafter)")
    p.add_argument("--random-categories", nargs="+", default=None,
                   help="One-for-All: give the subjects random distinct categories from this list every step")
    p.add_argument("--size", default="512x512", help="HEIGHTxWIDTH of the targets")
    p.add_argument("--ref-size", default=None, help="HEIGHTxWIDTH canvas of the references (default: --size)")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=None, help="default: the preset's learning rate")
    p.add_argument("--weight-decay", type=float, default=None, help="default: the preset's weight decay")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="micro batch per GPU")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trainable", default="adapter", help="adapter (LoRA/MoE-LoRA + DAM), lora, dam or all")
    p.add_argument("--guidance", type=float, default=None, help="distilled guidance fed in training (default: preset)")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="MCImageConfig overrides for ablations, e.g. adapter=none idar=false dam=true (JSON values)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--ema-decay", type=float, default=None)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # bare strings: adapter=none
    return out


def validate(args) -> None:
    """Everything that can be checked before a model loads."""
    from mcimage.config import PRESETS
    from mcimage.training import STAGES

    if args.adapter is None and args.preset not in PRESETS:
        raise InputError(f"--preset {args.preset!r} is unknown; known presets: {', '.join(sorted(PRESETS))}")
    if not Path(args.data).is_file():
        raise InputError(f"--data {args.data} does not exist")
    try:
        json.loads(Path(args.deepspeed_config).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"--deepspeed_config {args.deepspeed_config}: {err}") from None
    if args.base is not None and not (Path(args.base) / "transformer").is_dir():
        raise InputError(f"--base {args.base}: not a FLUX diffusers folder (no transformer/ subfolder)")
    if args.adapter is not None and not (Path(args.adapter) / "mcimage_config.json").is_file():
        raise InputError(f"--adapter {args.adapter}: no mcimage_config.json")
    if args.stage not in STAGES:
        raise InputError(f"--stage {args.stage!r}: use one of {', '.join(STAGES)}")
    if args.trainable not in POLICIES:
        raise InputError(f"--trainable {args.trainable!r}: use one of {', '.join(POLICIES)}")
    for name in ("max_steps", "batch_size", "grad_accum", "save_every", "keep_last", "log_every"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr is not None and args.lr <= 0:
        raise InputError(f"--lr {args.lr} must be positive")
    if args.attn_loss_weight < 0:
        raise InputError(f"--attn-loss-weight {args.attn_loss_weight} must be >= 0")
    if args.attn_loss_weight > 0 and args.stage == "single":
        raise InputError("--attn-loss-weight needs samples with several subjects; use --stage multi or all")
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        raise InputError(f"--ema-decay {args.ema_decay} must be in (0, 1)")
    parse_size(args.size, "--size", multiple=16)
    if args.ref_size is not None:
        parse_size(args.ref_size, "--ref-size", multiple=16)
    parse_overrides(args.overrides)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
        from mcimage.training import ImageDataArgs, ImageModelArgs, ImageTrainingSpec

        height, width = parse_size(args.size, "--size", multiple=16)
        ref_size = parse_size(args.ref_size, "--ref-size", multiple=16) if args.ref_size else None
        spec = ImageTrainingSpec(
            ImageModelArgs(preset=args.preset, base=args.base, adapter=args.adapter, init_seed=args.seed,
                           attn_loss_weight=args.attn_loss_weight, guidance=args.guidance,
                           overrides=parse_overrides(args.overrides)),
            ImageDataArgs(data=args.data, height=height, width=width, ref_size=ref_size, stage=args.stage,
                          random_categories=tuple(args.random_categories) if args.random_categories else None),
            policy=args.trainable,
        )
        spec.load_samples()  # manifest problems are reported before DeepSpeed starts
    except InputError as err:
        return fail(str(err))

    from idcrafter.train.trainer import AllSamplesFailed, TrainArgs, Trainer
    from idcrafter.utils.logging import setup_logging

    setup_logging()
    cfg = spec.config
    train_args = TrainArgs(
        output=args.output, deepspeed_config=args.deepspeed_config, max_steps=args.max_steps,
        lr=args.lr if args.lr is not None else cfg.learning_rate,
        weight_decay=args.weight_decay if args.weight_decay is not None else cfg.weight_decay,
        warmup_steps=args.warmup_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        grad_clip=args.grad_clip, seed=args.seed, trainable=args.trainable,
        gradient_checkpointing=args.gradient_checkpointing, ema_decay=args.ema_decay, save_every=args.save_every,
        keep_last=args.keep_last, resume=args.resume, log_every=args.log_every, progress=not args.no_progress,
    )
    try:
        summary = Trainer(spec, train_args).run()
    except (InputError, AllSamplesFailed) as err:
        return fail(str(err))
    if summary.get("failed_samples"):
        print(f"skipped {summary['failed_samples']} samples that failed to decode", file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "failed_sample_ids"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
