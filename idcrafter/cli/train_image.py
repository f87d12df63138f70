"""Train MultiCrafter or One-for-All (SFT) on FLUX with DeepSpeed, from one CPU to many GPU nodes.

MultiCrafter's progressive recipe (two runs, the second from the first's adapter):

    deepspeed --num_gpus 8 scripts/train_image.py --preset multicrafter --base FLUX.1-dev \\
        --data data/images.jsonl --stage single --max-steps 40000 --output runs/mc_single \\
        --deepspeed_config ds_configs/zero3.json --gradient-checkpointing
    deepspeed --num_gpus 8 scripts/train_image.py --preset multicrafter --base FLUX.1-dev \\
        --adapter runs/mc_single/adapter --data data/images.jsonl --stage multi --max-steps 25000 \\
        --output runs/mc_multi --deepspeed_config ds_configs/zero3.json

The preset carries the paper's settings (MultiCrafter supp. Sec. B): lr 3e-5 for single-subject
pre-training, 1e-5 and the IDAR loss at lambda 0.3 for multi-subject training; `--lr` and
`--attn-loss-weight` override them.

One-for-All, single-subject pairs of any category, each keeping its own category (Sec. 3.2), the
pairs resampled 2:2:2:1 by face / upper / lower / bag (App. H; `--category-weights`):

    deepspeed --num_gpus 8 scripts/train_image.py --preset one-for-all --base FLUX.1-Kontext-dev \\
        --data data/pairs.jsonl --stage single --output runs/ofa

The manifest (docs/design.md 8) has image samples: {"id", "image", "prompt", "subjects": [{"image",
"mask"?, "category", "descriptor"?}]}. Without --base the preset's components start from random
weights (tests, the toy world). Writes OUTPUT/checkpoints (DeepSpeed, for --resume), OUTPUT/adapter
(for inference; with --trainable all also OUTPUT/adapter/pipeline), OUTPUT/tensorboard,
OUTPUT/metrics.jsonl, OUTPUT/training.png and OUTPUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from idcrafter.train.cli import setting
from idcrafter.utils.cli import ArgumentParser, InputError, fail, number, parse_size, user_file

POLICIES = ("adapter", "lora", "dam", "all")


# Listed before the run options in --help: what the run reads.
INPUT_FIELDS = ("preset", "base", "adapter", "data")


@dataclass
class ImageSettings:
    """The options of train_image.py besides the shared `RunSettings` (lr and weight decay default
    to the preset's); `build_parser` generates the command line from both."""

    preset: str | None = setting(
        None, help="multicrafter, one-for-all, tiny-*, toyworld-* (default: tiny-multicrafter, or the adapter's)")
    base: str | None = setting(None, help="FLUX diffusers folder (default: random init of the preset)")
    adapter: str | None = setting(None, help="adapter folder to start from (e.g. the single-subject stage)")
    data: str = setting(required=True, help="JSONL manifest of image samples")
    stage: str = setting("all", choices=("all", "single", "multi"),
                         help="all, single (one-subject samples) or multi (two or more)")
    attn_loss_weight: float | None = setting(
        None, type=number(0, 100), help="lambda of the IDAR loss (default: the preset's, 0.3 for MultiCrafter, in the "
                                        "stages with several subjects; 0 for single-subject training)")
    category_weights: str | None = setting(
        None, metavar="CAT=W,...|none", help="resample single-subject pairs by category (default: the preset's; "
                                              "One-for-All 2:2:2:1 face=2,upper=2,lower=2,bag=1); none: no resampling")
    size: str = setting("512x512", help="HEIGHTxWIDTH of the targets")
    ref_size: str | None = setting(None, help="HEIGHTxWIDTH canvas of the references (default: --size)")
    trainable: str = setting("adapter", choices=POLICIES, help="adapter (LoRA/MoE-LoRA + DAM), lora, dam or all")
    guidance: float | None = setting(None, type=number(0, 100), help="distilled guidance fed in training (default: preset)")
    overrides: list = setting([], flags=("--set",), nargs="+", metavar="KEY=VALUE",
                              help="MCImageConfig overrides for ablations, e.g. adapter=none idar=false dam=true "
                                   "(JSON values)")
    gradient_checkpointing: bool = setting(False)
    merged_lora_routing: str | None = setting(
        None, metavar="W1,...,WE",
        help="also export a MoE-LoRA as a diffusers LoRA (pytorch_lora_weights.safetensors) with its E experts merged "
             "at these fixed gates, e.g. a mean routing from analyze_routing.py: an approximation of the routed "
             "adapter (a plain LoRA is always exported exactly)")


def build_parser() -> ArgumentParser:
    from idcrafter.train.cli import add_dataclass_arguments, add_run_arguments, add_validation_arguments

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p, ImageSettings, only=INPUT_FIELDS)
    add_run_arguments(p, lr=None, weight_decay=None)
    add_dataclass_arguments(p, ImageSettings, exclude=INPUT_FIELDS)
    add_validation_arguments(p)
    return p


def parse_routing(text: str | None) -> tuple[float, ...] | None:
    """--merged-lora-routing "0.5,0.5" -> (0.5, 0.5): finite gates >= 0, not all 0."""
    if text is None:
        return None
    from idcrafter.utils.cli import check_number

    gates = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise InputError(f"--merged-lora-routing {text!r}: {part.strip()!r} is not a number") from None
        gates.append(check_number(value, f"--merged-lora-routing {text!r}", 0))
    gates = tuple(gates)
    if not any(gates):
        raise InputError(f"--merged-lora-routing {text!r}: every gate is 0")
    return gates


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


def parse_category_weights(text: str | None) -> dict[str, float] | None | str:
    """--category-weights: "face=2,upper=2,lower=2,bag=1" -> {name: weight}; "none" -> None;
    not given -> "preset" (the config keeps its own)."""
    if text is None:
        return "preset"
    if text.strip().lower() == "none":
        return None
    from idcrafter.core.categories import canonical_category
    from idcrafter.utils.cli import check_number

    weights = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise InputError(f"--category-weights {text!r}: expected CATEGORY=WEIGHT,... or none")
        try:
            weights[canonical_category(name)] = check_number(float(value), f"--category-weights {name}", 0)
        except ValueError as err:  # unknown category, not a number (InputError is a ValueError)
            raise InputError(f"--category-weights {text!r}: {str(err).splitlines()[0]}") from None
    if not any(weights.values()):
        raise InputError(f"--category-weights {text!r}: every weight is 0")
    return weights


def overrides(args) -> dict:
    """--set overrides plus --category-weights."""
    out = parse_overrides(args.overrides)
    weights = parse_category_weights(args.category_weights)
    if weights != "preset":
        out["category_weights"] = weights
    return out


def validate(args) -> None:
    """Everything that can be checked before a model loads or a file is written."""
    from idcrafter.train.cli import check_run_paths, check_validation
    from idcrafter.utils.folders import check_model_folder
    from mcimage.config import PRESETS
    from mcimage.infer import check_size, read_adapter

    if args.preset is not None and args.preset not in PRESETS:
        raise InputError(f"--preset {args.preset!r} is unknown; known presets: {', '.join(sorted(PRESETS))}")
    check_run_paths(args)
    check_validation(args)
    if args.base is not None:
        check_model_folder(args.base, "--base", required=("transformer", "vae"))
    if args.adapter is not None:
        read_adapter(Path(args.adapter), "--adapter", Path(args.base) if args.base else None, args.preset)
    if args.attn_loss_weight and args.stage == "single":
        raise InputError("--attn-loss-weight needs samples with several subjects; use --stage multi or all")
    parse_routing(args.merged_lora_routing)
    check_size(*parse_size(args.size, "--size", multiple=16))
    if args.ref_size is not None:
        check_size(*parse_size(args.ref_size, "--ref-size", multiple=16), "--ref-size")
    overrides(args)


def main(argv=None) -> int:
    from idcrafter.train.cli import parse_settings, settings_dict

    parser = build_parser()
    try:
        with user_file():  # the library's messages name the option (--data, --base, --adapter, ...)
            args = parse_settings(parser, argv)
            validate(args)
            from mcimage.training import ImageDataArgs, ImageModelArgs, ImageTrainingSpec

            height, width = parse_size(args.size, "--size", multiple=16)
            ref_size = parse_size(args.ref_size, "--ref-size", multiple=16) if args.ref_size else None
            spec = ImageTrainingSpec(
                ImageModelArgs(preset=args.preset or "tiny-multicrafter", base=args.base, adapter=args.adapter,
                               init_seed=args.seed, attn_loss_weight=args.attn_loss_weight, guidance=args.guidance,
                               overrides=overrides(args), merged_lora_routing=parse_routing(args.merged_lora_routing)),
                ImageDataArgs(data=args.data, height=height, width=width, ref_size=ref_size, stage=args.stage),
                policy=args.trainable,
            )
            spec.load_samples()  # manifest problems are reported before DeepSpeed starts
            if args.validate_every:
                spec.validation_items(args.validation_data, args.validation_samples)
    except InputError as err:
        return fail(str(err))

    from idcrafter.train.cli import run_training, train_args
    from idcrafter.train.trainer import Trainer
    from idcrafter.utils.logging import setup_logging

    setup_logging()
    cfg = spec.config
    # MultiCrafter supp. Sec. B: multi-subject training at a lower rate than single-subject pre-training.
    preset_lr = cfg.multi_learning_rate if args.stage == "multi" and cfg.multi_learning_rate else cfg.learning_rate
    run_args = train_args(args, lr=args.lr if args.lr is not None else preset_lr,
                          weight_decay=args.weight_decay if args.weight_decay is not None else cfg.weight_decay)
    args.lr, args.weight_decay = run_args.lr, run_args.weight_decay  # saved as resolved
    run_args.settings = settings_dict(parser, args)
    return run_training(Trainer(spec, run_args))


if __name__ == "__main__":
    sys.exit(main())
