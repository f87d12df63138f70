"""The command-line options every training script shares (SFT video and image, RL), with their
checks: numbers typed and bounded at parsing, paths checked before DeepSpeed starts, so a bad run
stops with one line and leaves no run folder behind."""

from __future__ import annotations

import argparse
from pathlib import Path

from idcrafter.train.ds_config import LR_SCHEDULES
from idcrafter.utils.cli import (
    InputError,
    check_input_file,
    check_output_dir,
    integer,
    number,
    seed,
)

__all__ = ["add_run_arguments", "check_run_paths", "train_args"]


def add_run_arguments(p: argparse.ArgumentParser, *, max_steps: int | None = 1000, lr: float | None = 1e-5,
                      weight_decay: float | None = 1e-2, save_every: int = 500, log_every: int = 10,
                      batch: bool = True, ema: bool = True) -> None:
    """The run options (DeepSpeed config, output, resume, optimiser, schedule, checkpoints, logs).

    `lr` / `weight_decay` / `max_steps` None: the option defaults to None (the model's preset, or the
    script, decides).
    `batch`: add --batch-size and --grad-accum; `ema`: add --ema-decay.
    """
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default="ds_configs/zero2.json")
    p.add_argument("--output", required=True, help="run folder")
    p.add_argument("--resume", default=None, help="'auto' (the newest complete checkpoint) or a checkpoint tag")
    p.add_argument("--max-steps", type=integer(1), default=max_steps,
                   help=None if max_steps is not None else "optimizer steps (default: the paper's, per branch)")
    p.add_argument("--lr", type=number(0, 1, lo_open=True), default=lr,
                   help="learning rate" + (" (default: the preset's)" if lr is None else ""))
    p.add_argument("--weight-decay", type=number(0, 1), default=weight_decay,
                   help="AdamW weight decay" + (" (default: the preset's)" if weight_decay is None else ""))
    p.add_argument("--warmup-steps", type=integer(0), default=0, help="linear warm-up steps")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="after the warm-up: constant, or a linear or cosine decay to --min-lr-ratio x --lr at "
                        "--max-steps (DeepSpeed's WarmupLR / WarmupDecayLR / WarmupCosineLR)")
    p.add_argument("--min-lr-ratio", type=number(0, 1), default=0.0,
                   help="the learning rate linear and cosine decay to, as a fraction of --lr")
    if batch:
        p.add_argument("--batch-size", type=integer(1, 4096), default=1, help="micro batch per GPU")
        p.add_argument("--grad-accum", type=integer(1, 4096), default=1)
    p.add_argument("--grad-clip", type=number(0, lo_open=True), default=1.0, help="gradient-norm clip")
    p.add_argument("--seed", type=seed, default=0)
    if ema:
        p.add_argument("--ema-decay", type=number(0, 1, lo_open=True, hi_open=True), default=None)
    p.add_argument("--save-every", type=integer(1), default=save_every)
    p.add_argument("--keep-last", type=integer(1), default=2)
    p.add_argument("--log-every", type=integer(1), default=log_every)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def check_run_paths(args: argparse.Namespace, data_flags: tuple[str, ...] = ("data",)) -> None:
    """The run's files, before anything loads or is written: the manifests exist, the DeepSpeed
    config is a JSON object, the run folder can be created (or, resuming, written) there."""
    from idcrafter.utils.folders import read_json_object

    for name in data_flags:
        if getattr(args, name, None) is not None:
            check_input_file(getattr(args, name), f"--{name.replace('_', '-')}")
    ds_config = read_json_object(Path(args.deepspeed_config), "--deepspeed_config")
    if "scheduler" in ds_config and getattr(args, "lr_schedule", "constant") != "constant":
        raise InputError(f"--lr-schedule {args.lr_schedule}: --deepspeed_config {args.deepspeed_config} has its own "
                         "\"scheduler\" section; remove one of the two")
    check_output_dir(args.output, "--output")
    if args.resume is not None and args.resume != "auto" and ("/" in args.resume or args.resume in ("", ".", "..")):
        raise InputError(f"--resume {args.resume!r}: give 'auto' or a checkpoint tag such as step_00000500")


def train_args(args: argparse.Namespace, **overrides):
    """`TrainArgs` from the shared options (`overrides` for what a script sets otherwise)."""
    from idcrafter.train.trainer import TrainArgs

    values = dict(
        output=args.output, deepspeed_config=args.deepspeed_config, max_steps=args.max_steps, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule,
        min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip, seed=args.seed,
        save_every=args.save_every, keep_last=args.keep_last, resume=args.resume, log_every=args.log_every,
        progress=not args.no_progress,
    )
    for name in ("batch_size", "grad_accum", "ema_decay", "trainable", "gradient_checkpointing"):
        if hasattr(args, name):
            values[name] = getattr(args, name)
    values.update(overrides)
    return TrainArgs(**values)
