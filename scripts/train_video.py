#!/usr/bin/env python
"""Train ID-Crafter (SFT) with DeepSpeed, from one CPU to many GPU nodes.

    deepspeed --num_gpus 8 scripts/train_video.py --preset wan-1.3b --base Wan2.1-T2V-1.3B-Diffusers \\
        --data data/train.jsonl --deepspeed_config ds_configs/zero3.json --output runs/idcrafter \\
        --max-steps 20000 --lr 1e-5 --attn-loss-weight 0.3 --gradient-checkpointing --resume auto
    deepspeed --hostfile hosts.txt scripts/train_video.py ...        # many nodes

Without --base the preset's transformer starts from random weights (tests, toy models). Writes
OUTPUT/checkpoints (DeepSpeed, for --resume), OUTPUT/adapter (for inference), OUTPUT/tensorboard,
OUTPUT/metrics.jsonl, OUTPUT/training.png and OUTPUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from idcrafter.utils.cli import InputError, fail  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny, wan-1.3b or wan-14b")
    p.add_argument("--base", default=None, help="Wan 2.1 diffusers folder (default: random init of the preset)")
    p.add_argument("--adapter", default=None, help="adapter folder to start from")
    p.add_argument("--data", required=True, help="JSONL manifest")
    p.add_argument("--cache", default=None, help="feature cache folder (idcrafter.data.cache) to read encodings from")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default="ds_configs/zero2.json")
    p.add_argument("--output", required=True, help="run folder")
    p.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint) or a checkpoint tag")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="micro batch per GPU")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trainable", default="new-modules", help="new-modules, new-modules+lora or full")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--attn-loss-weight", type=float, default=0.0, help="lambda of the IDAR loss (0.3 in MultiCrafter)")
    p.add_argument("--drop-subjects", type=float, default=0.1, help="probability of training without subjects (for guidance)")
    p.add_argument("--drop-text", type=float, default=0.1, help="probability of training with the empty prompt (for guidance)")
    p.add_argument("--hierarchy", default=None, help="ablations: full (default), stage3 or plain")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--ema-decay", type=float, default=None)
    p.add_argument("--frames", type=int, default=None, help="frames per clip, 4n+1 (default: preset)")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--size", default=None, help="HEIGHTxWIDTH of the training bucket (default: preset)")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def validate(args) -> None:
    """Everything that can be checked before a model loads."""
    from idcrafter.video.config import PRESETS

    if args.preset not in PRESETS:
        raise InputError(f"--preset {args.preset!r} is unknown; known presets: {', '.join(sorted(PRESETS))}")
    if not Path(args.data).is_file():
        raise InputError(f"--data {args.data} does not exist")
    ds = Path(args.deepspeed_config)
    try:
        json.loads(ds.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"--deepspeed_config {ds}: {err}") from None
    if args.base is not None and not (Path(args.base) / "transformer").is_dir():
        raise InputError(f"--base {args.base}: not a Wan diffusers folder (no transformer/ subfolder)")
    if args.adapter is not None and not (Path(args.adapter) / "idcrafter_config.json").is_file():
        raise InputError(f"--adapter {args.adapter}: no idcrafter_config.json")
    if args.trainable not in ("new-modules", "new-modules+lora", "full"):
        raise InputError(f"--trainable {args.trainable!r}: use new-modules, new-modules+lora or full")
    for name in ("max_steps", "batch_size", "grad_accum", "save_every", "keep_last", "log_every", "lora_rank"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        raise InputError(f"--lr {args.lr} must be positive")
    if args.attn_loss_weight < 0:
        raise InputError(f"--attn-loss-weight {args.attn_loss_weight} must be >= 0")
    if args.frames is not None and (args.frames < 1 or (args.frames - 1) % 4):
        raise InputError(f"--frames {args.frames}: must be 4n+1")
    if args.size is not None:
        from idcrafter.utils.cli import parse_size

        h, w = parse_size(args.size)
        if h % 16 or w % 16:
            raise InputError(f"--size {args.size}: height and width must be multiples of 16")
    for name in ("drop_subjects", "drop_text"):
        if not 0 <= getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be in [0, 1)")
    if args.hierarchy not in (None, "full", "stage3", "plain"):
        raise InputError(f"--hierarchy {args.hierarchy!r}: use full, stage3 or plain")
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        raise InputError(f"--ema-decay {args.ema_decay} must be in (0, 1)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
    except InputError as err:
        return fail(str(err))

    from idcrafter.train.trainer import AllSamplesFailed, TrainArgs, Trainer
    from idcrafter.utils.cli import parse_size
    from idcrafter.utils.logging import setup_logging
    from idcrafter.video.training import VideoDataArgs, VideoModelArgs, VideoTrainingSpec

    setup_logging()
    height, width = parse_size(args.size) if args.size else (None, None)
    spec = VideoTrainingSpec(
        VideoModelArgs(preset=args.preset, base=args.base, adapter=args.adapter, lora_rank=args.lora_rank,
                       attn_loss_weight=args.attn_loss_weight, init_seed=args.seed,
                       drop_subjects=args.drop_subjects, drop_text=args.drop_text, hierarchy=args.hierarchy),
        VideoDataArgs(data=args.data, num_frames=args.frames, fps=args.fps, height=height, width=width, cache=args.cache),
        policy=args.trainable,
    )
    train_args = TrainArgs(
        output=args.output, deepspeed_config=args.deepspeed_config, max_steps=args.max_steps, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, grad_clip=args.grad_clip, seed=args.seed, trainable=args.trainable,
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
