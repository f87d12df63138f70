"""Train ID-Crafter (SFT) with DeepSpeed, from one CPU to many GPU nodes.

    deepspeed --num_gpus 8 scripts/train_video.py --preset wan-1.3b --base Wan2.1-T2V-1.3B-Diffusers \\
        --data data/train.jsonl --deepspeed_config ds_configs/zero3.json --output runs/idcrafter \\
        --max-steps 20000 --lr 1e-5 --attn-loss-weight 0.3 --gradient-checkpointing --resume auto
    deepspeed --hostfile hosts.txt scripts/train_video.py ...        # many nodes
    deepspeed --num_gpus 8 scripts/train_video.py --sp-size 4 ...    # 2 groups of 4 GPUs per sample

With --vlm QWEN_DIR (a Qwen2.5-VL folder) the VLM semantic encoder trains as well (ID-Crafter
Sec. 3.2): the frozen VLM reads each sample's prompt and references on every rank (or its states
come from a feature cache built with the same --vlm), and the connector joins the adapter, which
records the VLM folder for inference and RL.

Without --base the preset's transformer starts from random weights (tests, toy models). Writes
OUTPUT/checkpoints (DeepSpeed, for --resume), OUTPUT/adapter (for inference), OUTPUT/tensorboard,
OUTPUT/metrics.jsonl, OUTPUT/training.png and OUTPUT/summary.json.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from idcrafter.train.cli import setting
from idcrafter.utils.cli import ArgumentParser, InputError, fail, integer, number, user_file
from idcrafter.video.config import HIERARCHIES, STAGE3_INITS, STAGE3_PROJECTIONS

# Listed before the run options in --help: what the run reads.
INPUT_FIELDS = ("preset", "base", "adapter", "data", "cache", "vlm")


@dataclass
class VideoSettings:
    """The options of train_video.py besides the shared `RunSettings`; `build_parser` generates
    the command line from both."""

    preset: str | None = setting(None, help="tiny, toyworld, wan-1.3b or wan-14b (default: tiny, or the adapter's)")
    base: str | None = setting(None, help="Wan 2.1 diffusers folder (default: random init of the preset)")
    adapter: str | None = setting(None, help="adapter folder to start from")
    data: str = setting(required=True, help="JSONL manifest")
    cache: str | None = setting(None, help="feature cache folder (idcrafter.data.cache) to read encodings from")
    vlm: str | None = setting(None, help="Qwen2.5-VL folder: train with the VLM semantic encoder "
                              "(default: the adapter's recorded VLM when the adapter has one)")
    trainable: str = setting("new-modules", choices=("new-modules", "new-modules+lora", "full"))
    lora_rank: int = setting(64, type=integer(1, 4096))
    attn_loss_weight: float = setting(0.0, type=number(0, 100), help="lambda of the IDAR loss (0.3 in MultiCrafter)")
    drop_subjects: float = setting(0.1, type=number(0, 1, hi_open=True),
                                   help="probability of training without subjects (for guidance)")
    drop_text: float = setting(0.1, type=number(0, 1, hi_open=True),
                               help="probability of training with the empty prompt (for guidance)")
    hierarchy: str | None = setting(None, choices=HIERARCHIES,
                                    help="ablations of ID-Crafter Tab. S.5: no-intra, no-inter, no-cross (w/o stage "
                                         "1 / 2 / 3), stage3 (vanilla), plain (default: full)")
    stage3_projections: str | None = setting(None, choices=STAGE3_PROJECTIONS,
                                             help="stage 3 on attn2's query and output projection (attn2) or on "
                                                  "its own (own) (default: the preset's or the adapter's)")
    stage3_init: str | None = setting(None, choices=STAGE3_INITS,
                                      help="what starts at zero in a fresh attn2-form stage 3: the value projection "
                                           "(value) or the per-head gates (gate) (default: the preset's or the adapter's)")
    gradient_checkpointing: bool = setting(False)
    frames: int | None = setting(None, type=integer(1), help="frames per clip, 4n+1 (default: preset)")
    fps: int = setting(16, type=integer(1, 240), help="frame rate clips are sampled at")
    size: str | None = setting(None, help="HEIGHTxWIDTH of the training bucket (default: preset)")


def build_parser() -> ArgumentParser:
    from idcrafter.train.cli import add_dataclass_arguments, add_run_arguments, add_validation_arguments

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p, VideoSettings, only=INPUT_FIELDS)
    add_run_arguments(p, sequence_parallel=True)
    add_dataclass_arguments(p, VideoSettings, exclude=INPUT_FIELDS)
    add_validation_arguments(p)
    return p


def validate(args) -> list:
    """Everything that can be checked before a model loads or a file is written; returns the
    manifest's samples."""
    from idcrafter.data.manifest import read_samples
    from idcrafter.train.cli import check_run_paths, check_validation
    from idcrafter.utils.cli import check_input_dir, parse_size
    from idcrafter.utils.folders import check_model_folder
    from idcrafter.video.config import PRESETS, STAGE3_HIERARCHIES, IDCrafterConfig
    from idcrafter.video.infer import check_vlm, model_limits, read_adapter, vlm_hidden_size, vlm_identity

    if args.preset is not None and args.preset not in PRESETS:
        raise InputError(f"--preset {args.preset!r} is unknown; known presets: {', '.join(sorted(PRESETS))}")
    check_run_paths(args)
    check_validation(args)
    if args.cache is not None:
        check_input_dir(args.cache, "--cache")
    if args.base is not None:
        check_model_folder(args.base, "--base", required=("transformer", "vae", "text_encoder", "tokenizer"))
    if args.adapter is not None:
        config = read_adapter(Path(args.adapter), "--adapter", Path(args.base) if args.base else None, args.preset)
    else:
        config = IDCrafterConfig.from_preset(args.preset or "tiny")
    if args.vlm is not None:
        size = vlm_hidden_size(args.vlm)
        if config.use_vlm and config.vlm_dim != size:
            raise InputError(f"--vlm {args.vlm}: hidden size {size}, but --adapter {args.adapter}'s VLM connector "
                             f"reads {config.vlm_dim} (it was trained with another VLM)")
    elif config.use_vlm:  # an adapter with a connector keeps training it, on the VLM it recorded
        args.vlm = check_vlm(None, config, args.adapter, args.base)
    if args.vlm is not None and (args.hierarchy or config.hierarchy) not in STAGE3_HIERARCHIES:
        raise InputError(f"--vlm: the {args.hierarchy or config.hierarchy} ablation has no cross-modal attention "
                         "to read VLM tokens")
    if args.cache is not None:
        from idcrafter.data.cache import stored_encoders

        encoders = stored_encoders(args.cache)
        have, want = (encoders or {}).get("vlm"), vlm_identity(args.vlm) if args.vlm else None
        if encoders is not None and have != want:
            if have is None:
                raise InputError(f"--cache {args.cache} holds no VLM states (built without --vlm); rebuild it with "
                                 f"scripts/cache_features.py --vlm {args.vlm}")
            if want is None:
                raise InputError(f"--cache {args.cache} holds the VLM states of {have}: pass --vlm {have}, or use a "
                                 "cache built without --vlm")
            raise InputError(f"--cache {args.cache} holds the VLM states of {have}, not of --vlm {want}; rebuild it "
                             "with this --vlm")
    frames = args.frames if args.frames is not None else config.num_frames
    if (frames - 1) % 4:
        raise InputError(f"--frames {frames}: must be 4n+1")
    height, width = parse_size(args.size, multiple=16) if args.size else (config.height, config.width)
    model_limits(config, args.base).check(height, width, frames, 1)
    from idcrafter.train.cli import check_sp_size
    from idcrafter.video.infer import video_tokens

    check_sp_size(args.sp_size, config.wan.get("num_attention_heads"), video_tokens(config, height, width, frames))
    return read_samples(args.data)


def main(argv=None) -> int:
    from idcrafter.train.cli import parse_settings, settings_dict

    parser = build_parser()
    try:
        with user_file():  # the library's messages name the option (--data, --base, --adapter, ...)
            args = parse_settings(parser, argv)
            samples = validate(args)
            from idcrafter.train.cli import train_args
            from idcrafter.utils.cli import parse_size
            from idcrafter.video.training import VideoDataArgs, VideoModelArgs, VideoTrainingSpec

            height, width = parse_size(args.size) if args.size else (None, None)
            spec = VideoTrainingSpec(
                VideoModelArgs(preset=args.preset or "tiny", base=args.base, adapter=args.adapter, lora_rank=args.lora_rank,
                               attn_loss_weight=args.attn_loss_weight, init_seed=args.seed,
                               drop_subjects=args.drop_subjects, drop_text=args.drop_text, hierarchy=args.hierarchy,
                               stage3_projections=args.stage3_projections, stage3_init=args.stage3_init, vlm=args.vlm),
                VideoDataArgs(data=args.data, num_frames=args.frames, fps=args.fps, height=height, width=width,
                              cache=args.cache),
                policy=args.trainable, samples=samples,
            )
            if args.validate_every:  # a bad held-out manifest is reported before DeepSpeed starts
                spec.validation_items(args.validation_data, args.validation_samples)
    except InputError as err:
        return fail(str(err))

    from idcrafter.train.cli import run_training
    from idcrafter.train.trainer import Trainer
    from idcrafter.utils.logging import setup_logging

    setup_logging()
    return run_training(Trainer(spec, train_args(args, settings=settings_dict(parser, args))))


if __name__ == "__main__":
    sys.exit(main())
