"""MoE-LoRA routing change between two prompts, and optionally per-subject attention maps.

    python scripts/analyze_routing.py --prompt-a "a dog on a sofa" --prompt-b "a cat in the snow" \\
        --refs dog.png [cat.png] [--categories ...] [--model FOLDER --adapter ADAPTER | --preset tiny-multicrafter] \\
        --out DIR [--attention]

As MultiCrafter's supplement (Sec. H) measures it: the routing change |P_A - P_B| / (P_A + eps) of
each seed, averaged over --seeds seeds (4), on the double blocks' routed layers (--blocks). Writes
DIR/routing_change.png (gates of each prompt averaged over the seeds and the mean change, layers x
experts) and DIR/routing.json (the same numbers, and the seeds). With --attention
also DIR/attention_maps.png and DIR/attention_maps.npz (the per-subject attention maps of prompt A).
Without --model a random tiny model of --preset runs on the CPU (for trying the tool, not results).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from idcrafter.utils.cli import (
    MAX_SAMPLING_STEPS,
    ArgumentParser,
    InputError,
    check_device,
    fail,
    integer,
    number,
    parse_size,
    seed,
    user_file,
)
from idcrafter.utils.settings_file import add_config_argument, parse_command_line


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-a", required=True, help="first prompt (the reference of the change: P_A)")
    p.add_argument("--prompt-b", required=True, help="second prompt")
    p.add_argument("--refs", nargs="+", required=True, help="reference images, one per subject")
    p.add_argument("--categories", nargs="+", default=None, help="one category per reference (face, upper, ...)")
    p.add_argument("--model", default=None, help="FLUX diffusers folder (its mcimage_adapter/ unless --adapter)")
    p.add_argument("--adapter", default=None, help="mcimage adapter folder written by training (with --model)")
    p.add_argument("--preset", default="tiny-multicrafter", help="without --model: random model of this preset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--attention", action="store_true", help="also write the per-subject attention maps")
    p.add_argument("--size", default=None, help="HEIGHTxWIDTH (default 512x512, 32x32 for tiny presets)")
    p.add_argument("--steps", type=integer(1, MAX_SAMPLING_STEPS), default=None, help="denoising steps (default: from the model config)")
    p.add_argument("--seed", type=seed, default=0, help="first seed of the initial noise (same for both prompts)")
    p.add_argument("--seeds", type=integer(1, 64), default=4,
                   help="seeds the routing change is averaged over: --seed, --seed + 1, ... (MultiCrafter supp. Sec. H: 4)")
    p.add_argument("--blocks", default="double", choices=("double", "single", "all"),
                   help="routed layers of these blocks (MultiCrafter supp. Sec. H: the double blocks)")
    p.add_argument("--ref-size", default=None, help="HEIGHTxWIDTH canvas of the references (default: --size)")
    p.add_argument("--t", type=number(0, 1, lo_open=True), default=0.5, help="--attention: re-noising time in (0, 1]")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    add_config_argument(p)
    return p


def _size(text: str | None, tiny: bool, flag: str = "--size") -> tuple[int, int]:
    if text is None:
        return (32, 32) if tiny else (512, 512)
    return parse_size(text, flag)


def _validate(args) -> None:
    """Everything that can be checked before a model loads."""
    from idcrafter.utils.media import load_image

    for name in ("prompt_a", "prompt_b"):
        if not getattr(args, name).strip():
            raise InputError(f"--{name.replace('_', '-')} is empty")
    for ref in args.refs:
        with user_file("--refs"):  # a missing or unreadable file
            load_image(ref)
    if args.categories is not None and len(args.categories) != len(args.refs):
        raise InputError(f"--categories has {len(args.categories)} entries for {len(args.refs)} --refs")
    if args.adapter and not args.model:
        raise InputError("--adapter needs --model (the FLUX folder the adapter was trained on)")
    if args.ref_size is not None:
        _size(args.ref_size, False, "--ref-size")
    if args.model and not Path(args.model).is_dir():
        raise InputError(f"--model {args.model}: not a folder")
    if args.adapter and not Path(args.adapter).is_dir():
        raise InputError(f"--adapter {args.adapter}: not a folder")
    if args.steps is not None and args.steps <= 0:
        raise InputError(f"--steps must be positive, got {args.steps}")
    if not 0.0 < args.t <= 1.0:
        raise InputError(f"--t must be in (0, 1], got {args.t}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")


def _load(args):
    """(pipeline, config) from --model/--adapter or a random --preset model."""
    import torch

    from mcimage.config import MCImageConfig
    from mcimage.pipeline import MCImagePipeline
    from mcimage.transformer import MCImageTransformer

    if args.model:
        if "from_pretrained" not in vars(MCImagePipeline):
            raise InputError("--model: this version of mcimage cannot load FLUX folders (no MCImagePipeline.from_pretrained)")
        if args.adapter:
            config = MCImageTransformer.read_adapter_config(args.adapter)
            _require_moe(config, f"--adapter {args.adapter}")
        pipe = MCImagePipeline.from_pretrained(args.model, adapter=args.adapter)
        _require_moe(pipe.mc_config, f"--model {args.model}")
    else:
        config = MCImageConfig.from_preset(args.preset)
        _require_moe(config, f"--preset {args.preset}")
        from mcimage.presets import build_tiny_components

        pipe = MCImagePipeline.from_components(build_tiny_components(config, seed=0))
    return pipe.to(torch.device(args.device))


def _require_moe(config, what: str) -> None:
    if config.adapter != "moe_lora" or config.num_experts < 2:
        raise InputError(f"{what}: the model (adapter={config.adapter!r}) has no MoE-LoRA layers to analyse")


def main(argv=None) -> int:
    args = parse_command_line(build_parser(), argv)
    try:

        from mcimage.config import PRESETS

        if not args.model and args.preset not in PRESETS:
            raise InputError(f"--preset {args.preset!r}: unknown; known presets: {', '.join(sorted(PRESETS))}")
        tiny = not args.model and args.preset.startswith("tiny")
        height, width = _size(args.size, tiny)
        check_device(args.device)
        _validate(args)
        with user_file():  # the library's messages name --model, --adapter and their files
            pipe = _load(args)
        mult = pipe.vae_scale_factor * 2
        if height % mult or width % mult:
            raise InputError(f"--size {height}x{width}: height and width must be multiples of {mult}")
        try:
            pipe.check_inputs([args.prompt_a], args.refs, args.categories, height, width)
        except ValueError as err:  # the pipeline's checks of these user values (references, categories, markup)
            raise InputError(str(err).splitlines()[0]) from None
        write(pipe, args, height, width)
    except InputError as err:
        return fail(str(err).splitlines()[0] if str(err) else err.__class__.__name__)
    print(f"wrote {args.out}")
    return 0


def write(pipe, args, height: int, width: int) -> None:
    """Run the analyses, then write every output (each file atomically)."""
    import numpy as np

    from idcrafter.utils.io import atomic_write
    from mcimage.analysis import (
        attention_figure,
        routing_change_figure,
        routing_change_over_seeds,
        subject_attention_maps,
    )
    from mcimage.presets import TINY_T5_LENGTH

    tiny = not args.model and args.preset.startswith("tiny")
    text_length = TINY_T5_LENGTH if tiny else min(pipe.mc_config.text_length, int(pipe.tokenizer_2.model_max_length))
    common = dict(refs=args.refs, categories=args.categories, height=height, width=width, seed=args.seed,
                  steps=args.steps, max_sequence_length=text_length,
                  ref_size=_size(args.ref_size, False, "--ref-size") if args.ref_size else None)
    seeds = list(range(args.seed, args.seed + args.seeds))
    routing = {k: v for k, v in common.items() if k != "seed"}
    stats_a, stats_b, change = routing_change_over_seeds(pipe, args.prompt_a, args.prompt_b, seeds,
                                                         blocks=args.blocks, **routing)
    att = subject_attention_maps(pipe, args.prompt_a, t=args.t, **common) if args.attention else None

    out = Path(args.out)
    routing_change_figure(stats_a, stats_b, out / "routing_change.png", change=change)
    payload = {
        "prompt_a": args.prompt_a,
        "prompt_b": args.prompt_b,
        "seeds": seeds,
        "blocks": args.blocks,
        "layers": list(stats_a.layers),
        "experts": int(change.shape[1]),
        "gates_a": stats_a.probs.tolist(),
        "gates_b": stats_b.probs.tolist(),
        "change": change.tolist(),
        "mean_change_per_layer": change.mean(1).tolist(),
    }
    with atomic_write(out / "routing.json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    if att is not None:
        titles = list(args.categories) if args.categories else [Path(r).stem for r in args.refs]
        attention_figure(att.image, args.refs, att.maps, out / "attention_maps.png", titles=titles)
        with atomic_write(out / "attention_maps.npz") as tmp:
            np.savez(tmp, maps=att.maps, block_maps=att.block_maps, blocks=np.array(att.blocks), image=att.image,
                     t=np.float32(att.t), prompt=np.array(args.prompt_a))


if __name__ == "__main__":
    sys.exit(main())
