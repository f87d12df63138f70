#!/usr/bin/env python
"""Online RL post-training (Flow-GRPO / GSPO with a sliding SDE window) on DeepSpeed.

    deepspeed scripts/train_rl.py --branch video --base BASE [--adapter ADAPTER] \\
        --data prompts.jsonl --eval-data held_out.jsonl --output runs/rl \\
        --reward "face=0.3,nexus=0.3,aesthetic=0.24,natural=0.16" --reward-option face.backend=dlib
    deepspeed scripts/train_rl.py --branch image --objective gspo --preset multicrafter \\
        --base FLUX.1-dev --adapter runs/mc_multi/adapter --data prompts.jsonl --output runs/ippo \\
        --reward "face=0.5,clip_text=1.4,aesthetic=0.7" --size 512x512 --max-steps 300

The image branch (MultiCrafter's IPPO) defaults to the image composite of DESIGN 7 and the sliding
window T = 16, w = 2, tau = 50, s = 1.

The data is a standard manifest (DESIGN 8): only each line's prompt and subject images are used.
--reward takes name=weight pairs (default: the video composite of DESIGN 7); --reward-option
passes NAME.KEY=VALUE to one reward model (paths of its weights, device, ...). Writes TensorBoard
logs, training.png and reward_curve.png, checkpoints (resume with --resume auto) and the adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from idcrafter.utils.cli import InputError, fail, parse_size  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--branch", default="video", help="video (ID-Crafter on Wan) or image (mcimage on FLUX)")
    p.add_argument("--preset", default=None, help="config preset; without --base the random init of it "
                   "(default: tiny for video, tiny-multicrafter for image)")
    p.add_argument("--base", default=None, help="model folder (Wan or FLUX diffusers folder, optionally with its adapter)")
    p.add_argument("--adapter", default=None, help="adapter folder to start from")
    p.add_argument("--data", required=True, help="manifest of training prompts and references")
    p.add_argument("--eval-data", default=None, help="manifest of held-out prompts and references")
    p.add_argument("--output", required=True)
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default="ds_configs/zero2.json")
    p.add_argument("--reward", default=None, help="name=weight,... (default: the branch's composite)")
    p.add_argument("--reward-option", action="append", default=[], metavar="NAME.KEY=VALUE")
    p.add_argument("--objective", default="grpo", help="grpo or gspo")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--groups", type=int, default=1, help="groups per rank and iteration")
    p.add_argument("--num-steps", type=int, default=16, help="T sampling steps of a rollout")
    p.add_argument("--window", type=int, default=2, help="w SDE steps that are trained")
    p.add_argument("--window-every", type=int, default=50, help="tau: iterations between window moves")
    p.add_argument("--window-stride", type=int, default=1, help="s: steps the window moves")
    p.add_argument("--window-start", type=int, default=0)
    p.add_argument("--noise-level", type=float, default=1.0, help="a of the SDE step")
    p.add_argument("--clip-eps", type=float, default=1e-4)
    p.add_argument("--kl-weight", type=float, default=0.0, help="beta of the KL to the reference (LoRA off)")
    p.add_argument("--inner-epochs", type=int, default=1)
    p.add_argument("--normalise-rewards", action="store_true",
                   help="normalise each reward within its group before weighting (instead of weighting raw scores)")
    p.add_argument("--vlm", default=None, help="Qwen2.5-VL folder, for models trained with the VLM encoder")
    p.add_argument("--guidance-image", type=float, default=None)
    p.add_argument("--guidance-text", type=float, default=None)
    p.add_argument("--trainable", default="lora", help="video: lora, new-modules+lora, new-modules or full; "
                   "image: lora, adapter, dam or all")
    p.add_argument("--size", default=None, help="image branch: HEIGHTxWIDTH of the samples (default 512x512)")
    p.add_argument("--ref-size", default=None, help="image branch: HEIGHTxWIDTH canvas of the references")
    p.add_argument("--categories", nargs="+", default=None,
                   help="image branch with condition ids: categories of the references, in order")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate the held-out reward every N iterations")
    p.add_argument("--eval-limit", type=int, default=8)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--resume", default=None)
    p.add_argument("--device", default=None, help="device of the reward models (default: the training device)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def reward_options(pairs: list[str]) -> dict[str, dict]:
    options: dict[str, dict] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        name, dot, option = key.partition(".")
        if not sep or not dot or not name or not option:
            raise InputError(f"--reward-option {pair!r}: use NAME.KEY=VALUE")
        options.setdefault(name, {})[option.replace("-", "_")] = value
    return options


BRANCHES = ("video", "image")
POLICIES = {"video": ("lora", "new-modules+lora", "new-modules", "full"), "image": ("lora", "adapter", "dam", "all")}


def validate_image(args) -> None:
    from mcimage.config import PRESETS

    if args.preset is not None and args.preset not in PRESETS:
        raise InputError(f"--preset {args.preset!r} is not an image preset; known: {', '.join(sorted(PRESETS))}")
    if args.adapter is not None and not (Path(args.adapter) / "mcimage_config.json").is_file():
        raise InputError(f"--adapter {args.adapter}: no mcimage_config.json")
    if args.vlm is not None:
        raise InputError("--vlm applies to the video branch only")
    for flag in ("size", "ref_size"):
        if getattr(args, flag) is not None:
            parse_size(getattr(args, flag), f"--{flag.replace('_', '-')}", multiple=16)


def build_spec(args):
    """The branch's RLSpec (imports only the branch it needs)."""
    if args.branch == "image":
        from mcimage.rl import ImageRLSpec
        from mcimage.training import ImageModelArgs

        height, width = parse_size(args.size, "--size", multiple=16) if args.size else (512, 512)
        ref_size = parse_size(args.ref_size, "--ref-size", multiple=16) if args.ref_size else None
        try:
            return ImageRLSpec(
                ImageModelArgs(preset=args.preset or "tiny-multicrafter", base=args.base, adapter=args.adapter,
                               init_seed=args.seed),
                data=args.data, eval_data=args.eval_data, policy=args.trainable, height=height, width=width,
                ref_size=ref_size, categories=tuple(args.categories) if args.categories else None,
            )
        except ValueError as err:
            raise InputError(str(err)) from None
    from idcrafter.video.rl import VideoRLSpec
    from idcrafter.video.training import VideoModelArgs

    return VideoRLSpec(
        VideoModelArgs(preset=args.preset or "tiny", base=args.base, adapter=args.adapter, lora_rank=args.lora_rank,
                       init_seed=args.seed),
        data=args.data, eval_data=args.eval_data, policy=args.trainable,
        guidance_image=args.guidance_image, guidance_text=args.guidance_text, vlm=args.vlm,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.branch not in BRANCHES:
            raise InputError(f"--branch {args.branch!r}: use video or image")
        if args.branch == "image":
            validate_image(args)
        for name in ("data", "eval_data"):
            path = getattr(args, name)
            if path is not None and not Path(path).is_file():
                raise InputError(f"--{name.replace('_', '-')} {path} does not exist")
        if args.base is not None and not (Path(args.base) / "transformer").is_dir():
            raise InputError(f"--base {args.base}: not a diffusers folder (no transformer/ subfolder)")
        if args.vlm is not None and not Path(args.vlm).is_dir():
            raise InputError(f"--vlm {args.vlm}: not a folder")
        if args.trainable not in POLICIES[args.branch]:
            raise InputError(f"--trainable {args.trainable!r}: use {', '.join(POLICIES[args.branch])}")
        if args.kl_weight > 0 and "lora" not in args.trainable:
            raise InputError("--kl-weight needs a LoRA policy: the reference policy is the model with LoRA off")
        if args.lr <= 0 or args.max_steps < 1:
            raise InputError("--lr must be positive and --max-steps at least 1")
        from idcrafter.rewards.base import (
            IMAGE_WEIGHTS,
            VIDEO_WEIGHTS,
            CompositeReward,
            list_rewards,
            parse_weights,
        )
        from idcrafter.rl.trainer import RLArgs

        try:
            default = VIDEO_WEIGHTS if args.branch == "video" else IMAGE_WEIGHTS
            weights = parse_weights(args.reward) if args.reward else dict(default)
            unknown = sorted(set(weights) - set(list_rewards()))
            if unknown:
                raise InputError(f"--reward names unknown rewards {unknown}; known: {', '.join(list_rewards())}")
            rl = RLArgs(objective=args.objective, group_size=args.group_size, groups=args.groups,
                        num_steps=args.num_steps, window=args.window, window_every=args.window_every,
                        window_stride=args.window_stride, window_start=args.window_start,
                        noise_level=args.noise_level, clip_eps=args.clip_eps, kl_weight=args.kl_weight,
                        inner_epochs=args.inner_epochs, normalise_rewards=args.normalise_rewards, eval_every=args.eval_every, eval_limit=args.eval_limit)
            rl.sliding_window()
            options = reward_options(args.reward_option)
            unknown = sorted(set(options) - set(weights))
            if unknown:
                raise InputError(f"--reward-option names {unknown}, which are not in --reward {sorted(weights)}")
            import torch

            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            reward = CompositeReward(weights, options=options, device=device)
        except ValueError as err:
            raise InputError(str(err)) from None
    except InputError as err:
        return fail(str(err))

    from idcrafter.rl.trainer import RLTrainer
    from idcrafter.train.trainer import TrainArgs
    from idcrafter.utils.logging import setup_logging

    setup_logging()
    try:
        spec = build_spec(args)
    except InputError as err:
        return fail(str(err))
    train_args = TrainArgs(
        output=args.output, deepspeed_config=args.deepspeed_config, max_steps=args.max_steps, lr=args.lr,
        weight_decay=args.weight_decay, betas=(0.9, 0.95), warmup_steps=args.warmup_steps, batch_size=args.group_size,
        grad_clip=args.grad_clip, seed=args.seed, trainable=args.trainable, save_every=args.save_every,
        keep_last=args.keep_last, resume=args.resume, log_every=args.log_every, progress=not args.no_progress,
    )
    try:
        summary = RLTrainer(spec, train_args, rl, reward).run()
    except InputError as err:
        return fail(str(err))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
