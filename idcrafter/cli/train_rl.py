"""Online RL post-training (Flow-GRPO / GSPO with an SDE window) on DeepSpeed.

    deepspeed scripts/train_rl.py --branch video --base BASE [--adapter ADAPTER] \\
        --data prompts.jsonl --eval-data held_out.jsonl --output runs/rl \\
        --reward "face=0.3,nexus=0.3,aesthetic=0.24,natural=0.16" --reward-option face.backend=dlib
    deepspeed scripts/train_rl.py --branch image --preset multicrafter \\
        --base FLUX.1-dev --adapter runs/mc_multi/adapter --data prompts.jsonl --output runs/ippo \\
        --reward "face=0.5,clip_text=1.4,hps=0.7" --size 512x512 --max-steps 300

Defaults follow each paper. Video (ID-Crafter App. A.2, Tab. S.6): Flow-GRPO (the per-step
objective) with the SDE at every sampling step (`--window full`, noise level a = 1.0), refining
the identity modules (`--trainable new-modules`), lr 1e-5, AdamW (0.9, 0.95), gradient norm 1.0,
800 steps (the length of its Fig. S.7). Image (MultiCrafter supp. Sec. B, IPPO): GSPO on the sliding
window T = 16, w = 2, tau = 50, s = 1, 300 steps, the MoE-LoRA trained (`--trainable lora`). The KL
reference (`--kl-weight`) is the policy as it was when RL started in both branches: the model with
its LoRA off when RL trains a fresh LoRA (exactly that policy), else a frozen copy of the trained
weights.

The data is a standard manifest (docs/design.md 8): only each line's prompt and subject images are used.
--reward takes name=weight pairs (default: the video composite of docs/design.md 7); --reward-option
passes NAME.KEY=VALUE to one reward model (paths of its weights, device, ...). Writes TensorBoard
logs, training.png and reward_curve.png, checkpoints (resume with --resume auto) and the adapter.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from idcrafter.train.cli import setting
from idcrafter.utils.cli import (
    MAX_SAMPLING_STEPS,
    ArgumentParser,
    InputError,
    fail,
    integer,
    number,
    parse_size,
    user_file,
)

BRANCHES = ("video", "image")
# Per branch, what the paper it implements does (module docstring): objective, window, trainable set,
# length (ID-Crafter Fig. S.7 plots 800 RL steps; MultiCrafter supp. Sec. B: "300 steps").
BRANCH_DEFAULTS = {"video": dict(objective="grpo", window="full", trainable="new-modules", max_steps=800),
                   "image": dict(objective="gspo", window=2, trainable="lora", max_steps=300)}


def window_width(text: str) -> int | str:
    """argparse type of --window: 'full' or a width in [1, 1000]."""
    return "full" if text == "full" else integer(1, MAX_SAMPLING_STEPS)(text)


def resolve_branch_defaults(args) -> None:
    """Fill the options left out with the branch's paper defaults; --window full becomes T."""
    for key, value in BRANCH_DEFAULTS[args.branch].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.window == "full":
        args.window = args.num_steps
POLICIES = {"video": ("lora", "new-modules+lora", "new-modules", "full"), "image": ("lora", "adapter", "dam", "all")}


# Listed before the run options in --help: the branch and what the run reads.
INPUT_FIELDS = ("branch", "preset", "base", "adapter", "data", "eval_data")


@dataclass
class RLSettings:
    """The options of train_rl.py besides the shared `RunSettings`; None: the branch's paper value
    (`BRANCH_DEFAULTS`). `build_parser` generates the command line from both."""

    branch: str = setting("video", choices=BRANCHES, help="video (ID-Crafter on Wan) or image (mcimage on FLUX)")
    preset: str | None = setting(None, help="config preset; without --base the random init of it "
                                 "(default: tiny for video, tiny-multicrafter for image, or the adapter's)")
    base: str | None = setting(None, help="model folder (Wan or FLUX diffusers folder, optionally with its adapter)")
    adapter: str | None = setting(None, help="adapter folder to start from")
    data: str = setting(required=True, help="manifest of training prompts and references")
    eval_data: str | None = setting(None, help="manifest of held-out prompts and references")
    reward: str | None = setting(None, help="name=weight,... (default: the branch's composite)")
    subjects: str | None = setting(
        None, choices=("people", "objects"),
        help="image branch: the default composite for people (face 0.5, clip_text 1.4, hps 0.7) or objects "
             "(object 1.0, clip_text 1.4, hps 0.7), MultiCrafter supp. Sec. B")
    reward_option: list = setting([], action="append", metavar="NAME.KEY=VALUE")
    objective: str | None = setting(None, choices=("grpo", "gspo"),
                                    help="grpo (per-step ratios) or gspo (sequence ratio); default: grpo for video, "
                                         "gspo for image")
    group_size: int = setting(4, type=integer(2, 1024))
    groups: int = setting(1, type=integer(1, 1024), help="groups per rank and iteration")
    num_steps: int = setting(16, type=integer(1, MAX_SAMPLING_STEPS), help="T sampling steps of a rollout")
    window: int | str | None = setting(
        None, type=window_width, help="w SDE steps that are trained, or 'full' (every step); default: full for "
                                      "video, 2 for image")
    window_every: int = setting(50, type=integer(1), help="tau: iterations between window moves")
    window_stride: int = setting(1, type=integer(1, MAX_SAMPLING_STEPS), help="s: steps the window moves")
    window_start: int = setting(0, type=integer(0, MAX_SAMPLING_STEPS))
    # a scales the SDE step's std, a * sqrt(sigma / (1 - sigma)); Flow-GRPO uses 0.7, 1 is ours.
    noise_level: float = setting(1.0, type=number(0, 5, lo_open=True), help="a of the SDE step, in (0, 5]")
    clip_eps: float = setting(1e-4, type=number(0, 1, lo_open=True, hi_open=True))
    kl_weight: float = setting(0.0, type=number(0, 100), help="beta of the KL to the policy at the start of RL")
    inner_epochs: int = setting(1, type=integer(1, 100))
    normalise_rewards: bool = setting(
        False, help="normalise each reward within its group before weighting (instead of weighting raw scores)")
    vlm: str | None = setting(None, help="Qwen2.5-VL folder, for models trained with the VLM encoder")
    guidance_image: float | None = setting(None, type=number(0, 100))
    guidance_text: float | None = setting(None, type=number(0, 100))
    trainable: str | None = setting(None, help="video: new-modules (default), lora, new-modules+lora or full; "
                                    "image: lora (default: the MoE-LoRA), adapter, dam or all")
    size: str | None = setting(None, help="image branch: HEIGHTxWIDTH of the samples (default 512x512)")
    ref_size: str | None = setting(None, help="image branch: HEIGHTxWIDTH canvas of the references")
    categories: list | None = setting(None, nargs="+",
                                      help="image branch with condition ids: categories of the references, in order")
    lora_rank: int = setting(32, type=integer(1, 4096))
    eval_every: int = setting(0, type=integer(0), help="evaluate the held-out reward every N iterations")
    eval_limit: int = setting(8, type=integer(1))
    device: str | None = setting(None, help="device of the reward models (default: the training device)")


def build_parser() -> ArgumentParser:
    from idcrafter.train.cli import add_dataclass_arguments, add_run_arguments

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p, RLSettings, only=INPUT_FIELDS)
    add_run_arguments(p, max_steps=None, weight_decay=0.0, save_every=50, log_every=1, batch=False, ema=False,
                      sequence_parallel=True)
    add_dataclass_arguments(p, RLSettings, exclude=INPUT_FIELDS)
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


def branch_config(args):
    """The model config of the run (the adapter's, else the --base model's own, else the preset's),
    with its folders checked and a --preset that disagrees with the adapter refused."""
    from idcrafter.utils.folders import check_model_folder

    if args.branch == "image":
        from mcimage.config import PRESETS
        from mcimage.config import MCImageConfig as config_class
        from mcimage.infer import read_adapter

        default, parts = "tiny-multicrafter", ("transformer", "vae")
    else:
        from idcrafter.video.config import PRESETS
        from idcrafter.video.config import IDCrafterConfig as config_class
        from idcrafter.video.infer import read_adapter

        default, parts = "tiny", ("transformer", "vae", "text_encoder", "tokenizer")
    if args.preset is not None and args.preset not in PRESETS:
        raise InputError(f"--preset {args.preset!r} is not a {args.branch} preset; known: {', '.join(sorted(PRESETS))}")
    adapter = Path(args.adapter) if args.adapter else None
    if args.base is not None:
        check_model_folder(args.base, "--base", required=parts)
        if adapter is None:  # a base saved with its adapter holds its own config
            if args.branch == "video":
                from idcrafter.video.infer import read_model

                own = read_model(Path(args.base), "--base", args.preset)
            else:
                from mcimage.infer import read_model_config

                own = read_model_config(Path(args.base), "--base", args.preset)
            if own is not None:
                return own
        sub = Path(args.base) / ("mcimage_adapter" if args.branch == "image" else "idcrafter_adapter")
        adapter = adapter or (sub if sub.is_dir() else None)
    if adapter is None:
        return config_class.from_preset(args.preset or default)
    return read_adapter(adapter, "--adapter", Path(args.base) if args.base else None, args.preset)


def validate(args):
    """Everything that can be checked before DeepSpeed starts; returns the model config."""
    from idcrafter.data.manifest import read_samples
    from idcrafter.train.cli import check_run_paths
    from idcrafter.utils.cli import check_device

    check_run_paths(args, ("data", "eval_data"))
    resolve_branch_defaults(args)
    if args.trainable not in POLICIES[args.branch]:
        raise InputError(f"--trainable {args.trainable!r}: use {', '.join(POLICIES[args.branch])}")
    if args.device is not None:
        check_device(args.device)
    if args.window > args.num_steps or args.window_start > args.num_steps - args.window:
        raise InputError(f"--window {args.window} from --window-start {args.window_start} does not fit in "
                         f"--num-steps {args.num_steps}")
    config = branch_config(args)
    if args.branch == "image":
        from mcimage.infer import check_size

        if args.vlm is not None:
            raise InputError("--vlm applies to the video branch only")
        if args.sp_size != 1:
            raise InputError("--sp-size applies to the video branch only")
        for flag in ("size", "ref_size"):
            if getattr(args, flag) is not None:
                name = f"--{flag.replace('_', '-')}"
                check_size(*parse_size(getattr(args, flag), name, multiple=16), name)
    else:
        for flag in ("size", "ref_size", "categories", "subjects"):
            if getattr(args, flag) is not None:
                raise InputError(f"--{flag.replace('_', '-')} applies to the image branch only")
        from idcrafter.video.infer import check_vlm

        args.vlm = check_vlm(args.vlm, config, args.adapter, args.base)  # --vlm, or the adapter's recorded folder
        from idcrafter.train.cli import check_sp_size
        from idcrafter.video.infer import video_tokens

        # rollouts sample at the model config's size and frame count
        check_sp_size(args.sp_size, config.wan.get("num_attention_heads"),
                      video_tokens(config, config.height, config.width, config.num_frames))
    for name in ("data", "eval_data"):
        if getattr(args, name) is not None:
            read_samples(getattr(args, name), f"--{name.replace('_', '-')}", config.max_subjects)
    return config


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
                               init_seed=args.seed, attn_loss_weight=0.0),  # RL has no SFT loss: no capture
                data=args.data, eval_data=args.eval_data, policy=args.trainable, height=height, width=width,
                ref_size=ref_size, categories=tuple(args.categories) if args.categories else None,
            )
        except ValueError as err:  # unknown --categories
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
    from idcrafter.train.cli import parse_settings, settings_dict

    parser = build_parser()
    try:
        with user_file():  # the library's messages name the option (--data, --base, --adapter, ...)
            args = parse_settings(parser, argv)
            validate(args)
            from idcrafter.rewards.base import (
                IMAGE_OBJECT_WEIGHTS,
                IMAGE_WEIGHTS,
                VIDEO_WEIGHTS,
                CompositeReward,
                list_rewards,
                parse_weights,
            )
            from idcrafter.rl.trainer import RLArgs

            try:
                default = VIDEO_WEIGHTS if args.branch == "video" else \
                    IMAGE_OBJECT_WEIGHTS if args.subjects == "objects" else IMAGE_WEIGHTS
                weights = parse_weights(args.reward) if args.reward else dict(default)
                unknown = sorted(set(weights) - set(list_rewards()))
                if unknown:
                    raise InputError(f"--reward names unknown rewards {unknown}; known: {', '.join(list_rewards())}")
                rl = RLArgs(objective=args.objective, group_size=args.group_size, groups=args.groups,
                            num_steps=args.num_steps, window=args.window, window_every=args.window_every,
                            window_stride=args.window_stride, window_start=args.window_start,
                            noise_level=args.noise_level, clip_eps=args.clip_eps, kl_weight=args.kl_weight,
                            inner_epochs=args.inner_epochs, normalise_rewards=args.normalise_rewards,
                            eval_every=args.eval_every, eval_limit=args.eval_limit)
                rl.sliding_window()
                options = reward_options(args.reward_option)
                unknown = sorted(set(options) - set(weights))
                if unknown:
                    raise InputError(f"--reward-option names {unknown}, which are not in --reward {sorted(weights)}")
                import torch

                device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
                reward = CompositeReward(weights, options=options, device=device)
            except ValueError as err:  # the reward registry's and RLArgs' own checks of user values
                raise InputError(str(err)) from None
            spec = build_spec(args)
    except InputError as err:
        return fail(str(err))

    from idcrafter.rl.trainer import RLTrainer
    from idcrafter.train.cli import run_training, train_args
    from idcrafter.utils.logging import setup_logging

    setup_logging()
    run_args = train_args(args, betas=(0.9, 0.95), batch_size=args.group_size, settings=settings_dict(parser, args))
    return run_training(RLTrainer(spec, run_args, rl, reward))


if __name__ == "__main__":
    sys.exit(main())
