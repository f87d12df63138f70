"""Per-GPU memory and analytic FLOPs of an ID-Crafter training setup, and which setups fit.

    python scripts/plan.py --preset wan-14b --size 720x1280 --frames 81 --subjects 3 \\
        --batch 1 --zero 3 --sp-size 4 --gpus 8 --gpu-memory 80 [--offload] [--no-checkpointing]
    python scripts/plan.py --table --subjects 3 [--gpus 8 --gpu-memory 80]

Prints the weights, gradients, optimizer states (AdamW: fp32 master weights + two moments) and
activations of one GPU in GiB, the FLOPs of one optimizer step and whether it fits (90% of
--gpu-memory). --table prints the README's table (with --subjects 3): 1.3B and 14B at 480p and
720p x 81 frames over ZeRO stages, SP sizes and checkpointing (without it, ZeRO-3 only).
The model is idcrafter/video/memory.py (docs/design.md 11); --json prints the numbers as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

from idcrafter.utils.cli import ArgumentParser, InputError, fail, integer, number, parse_size
from idcrafter.utils.settings_file import add_config_argument, parse_command_line

PRESETS = ("tiny", "toyworld", "wan-1.3b", "wan-14b")
TABLE_MODELS = ("wan-1.3b", "wan-14b")
TABLE_SIZES = {"480p": (480, 832), "720p": (720, 1280)}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan-1.3b", choices=PRESETS, help="model size")
    p.add_argument("--size", default="480x832", help="HEIGHTxWIDTH of the training videos")
    p.add_argument("--frames", type=integer(1, 100001), default=81, help="frames per video (4n+1)")
    p.add_argument("--subjects", type=integer(0, 3), default=1, help="reference subjects per sample")
    p.add_argument("--batch", type=integer(1, 4096), default=1, help="micro-batch per GPU")
    p.add_argument("--zero", type=integer(0, 3), default=2, help="DeepSpeed ZeRO stage")
    p.add_argument("--sp-size", type=integer(1, 1024), default=1, help="sequence-parallel (Ulysses) group size")
    p.add_argument("--gpus", type=integer(1, 65536), default=8, help="GPUs in the run")
    p.add_argument("--gpu-memory", type=number(1, 10000), default=80.0, help="GiB of one GPU")
    p.add_argument("--offload", action="store_true", help="ZeRO offload of the optimizer (and weights with --zero 3)")
    p.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    p.add_argument("--trainable", default="new-modules", choices=("new-modules", "full"),
                   help="what trains: the ID-Crafter modules (base frozen) or everything")
    p.add_argument("--table", action="store_true", help="print the table of 1.3B and 14B at 480p and 720p")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_argument(p)
    return p


def _config(preset: str):
    from idcrafter.video.config import IDCrafterConfig

    return IDCrafterConfig.from_preset(preset)


def _setup(args, height: int, width: int, config):
    from idcrafter.video.memory import TrainSetup

    if (args.frames - 1) % 4:
        raise InputError(f"--frames {args.frames}: must be 4n+1 (the VAE's temporal stride)")
    if height % 16 or width % 16:
        raise InputError(f"--size {height}x{width}: height and width must be multiples of 16")
    if args.gpus % args.sp_size:
        raise InputError(f"--sp-size {args.sp_size}: does not divide --gpus {args.gpus}")
    if config.wan["num_attention_heads"] % args.sp_size:
        raise InputError(f"--sp-size {args.sp_size}: does not divide the {config.wan['num_attention_heads']} "
                         f"attention heads of {args.preset}")
    return TrainSetup(height, width, args.frames, subjects=args.subjects, batch=args.batch, zero=args.zero,
                      sp=args.sp_size, gpus=args.gpus, offload=args.offload,
                      checkpointing=not args.no_checkpointing, trainable=args.trainable)


def report(config, setup, gpu_gib: float) -> dict:
    """The plan of one setup as plain numbers (GiB, TFLOP)."""
    from idcrafter.video.memory import GIB, plan

    result = plan(config, setup)
    return {
        "preset": config.preset, "size": f"{setup.height}x{setup.width}", "frames": setup.frames,
        "subjects": setup.subjects, "batch": setup.batch, "zero": setup.zero, "sp": setup.sp, "gpus": setup.gpus,
        "offload": setup.offload, "checkpointing": setup.checkpointing, "trainable": setup.trainable,
        "weights_gib": result.weights / GIB, "gradients_gib": result.gradients / GIB,
        "optimizer_gib": result.optimizer / GIB, "activations_gib": result.activations / GIB,
        "zero3_gather_gib": result.zero3_gather / GIB, "total_gib": result.total / GIB,
        "cpu_offloaded_gib": result.cpu_offloaded / GIB, "step_tflop": result.step_flops / 1e12,
        "step_tflop_per_gpu": result.step_flops / setup.gpus / 1e12, "fits": result.fits(gpu_gib),
    }


def table_rows(gpus: int, gpu_gib: float, subjects: int = 3, trainable: str = "new-modules") -> list[dict]:
    """The smallest fitting setup, and the plain one, of each model and resolution (81 frames)."""
    from idcrafter.video.memory import TrainSetup

    rows = []
    for preset, (name, (h, w)) in itertools.product(TABLE_MODELS, TABLE_SIZES.items()):
        config = _config(preset)
        heads = config.wan["num_attention_heads"]
        for checkpointing, zero, sp in itertools.product((False, True), (2, 3), (1, 2, 4, 8)):
            if gpus % sp or heads % sp or (not checkpointing and zero == 2):
                continue
            row = report(config, TrainSetup(h, w, 81, subjects=subjects, zero=zero, sp=sp, gpus=gpus,
                                            checkpointing=checkpointing, trainable=trainable), gpu_gib)
            row["resolution"] = name
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| model | video | ckpt | ZeRO | SP | weights | grads | optim | activations | total GiB | "
            "TFLOP/step/GPU | fits |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['resolution']} x {r['frames']} | {'yes' if r['checkpointing'] else 'no'} "
                     f"| {r['zero']} | {r['sp']} | {r['weights_gib']:.1f} | {r['gradients_gib']:.2f} "
                     f"| {r['optimizer_gib']:.2f} | {r['activations_gib']:.1f} | {r['total_gib']:.1f} "
                     f"| {r['step_tflop_per_gpu']:.0f} | {'yes' if r['fits'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_command_line(build_parser(), argv)
    try:
        if args.table:
            rows = table_rows(args.gpus, args.gpu_memory, args.subjects, args.trainable)
            print(json.dumps(rows, indent=1) if args.json else format_table(rows))
            return 0
        height, width = parse_size(args.size)
        config = _config(args.preset)
        result = report(config, _setup(args, height, width, config), args.gpu_memory)
    except InputError as err:
        return fail(str(err).splitlines()[0])
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value:.2f}" if isinstance(value, float) else f"{key:>20}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
