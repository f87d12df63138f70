"""Generate one video of the given subjects with ID-Crafter, or one image with MultiCrafter / One-for-All.

    python scripts/infer.py --refs A.png B.png --prompt "..." --out out.mp4
    torchrun --nproc_per_node 2 scripts/infer.py --sp-size 2 --refs A.png B.png --prompt "..." --out out.mp4
    python scripts/infer.py --mode image --refs A.png B.png --categories face upper \
        --prompt "a man <face>with short hair</face> in <upper>a red hoodie</upper>" --out out.png

Without --model the built-in default model runs on the CPU in seconds: the toy-world model
shipped in idcrafter/assets/toyworld (a small ID-Crafter trained with this code on synthetic
toy identities, 64x64, 9 frames; it draws toy sprites such as examples/*.png, not people), or,
in a checkout without it, the `tiny` preset with random weights (noise-like output). --preset
tiny forces the random one. For real results pass --model (a Wan 2.1 diffusers folder) and
--adapter (an ID-Crafter adapter folder from training).

--sp-size N renders one video on the N ranks a launcher starts (sequence parallelism: each rank
holds 1/N of the video tokens, attention exchanges heads; the heads and the tokens must divide by
N); rank 0 writes the video.

Image mode is chosen by --mode image, by an image preset (multicrafter, one-for-all,
tiny-multicrafter, tiny-one-for-all), or by --model / --adapter folders of the image branch (a
FLUX pipeline, or one with mcimage_adapter/). Without --model it runs the built-in image model:
the tiny-multicrafter preset with random weights unless --preset picks the other tiny one.
"""

from __future__ import annotations

import argparse
import os
import sys

from idcrafter.utils.cli import ArgumentParser, InputError, fail, integer, number, seed, user_file
from idcrafter.utils.settings_file import add_config_argument, parse_command_line

# Options that only one mode reads; giving one to the other mode is an error, not silently ignored.
VIDEO_ONLY = ("negative_prompt", "frames", "guidance_image", "guidance_text", "guidance_interval", "edit_video", "strength",
              "cpu_offload", "sequential_guidance", "vlm", "sp_size")
IMAGE_ONLY = ("categories", "guidance")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("video", "image"), default=None,
                   help="video (ID-Crafter, default) or image (MultiCrafter / One-for-All); see above")
    p.add_argument("--refs", nargs="+", required=True, help="reference images, one per subject")
    p.add_argument("--categories", nargs="+", default=None,
                   help="image mode: one category per reference (face, upper, lower, bag); One-for-All needs them")
    p.add_argument("--prompt", required=True, help="text prompt (image mode: may mark <face>item descriptors</face>)")
    p.add_argument("--out", required=True,
                   help="output path: .mp4, .webm, .mov, .mkv or .gif (video); .png or .jpg (image)")
    p.add_argument("--model", default=None, help="Wan 2.1 or FLUX diffusers folder (default: the built-in tiny model)")
    p.add_argument("--adapter", default=None,
                   help="adapter folder (default: MODEL/idcrafter_adapter or MODEL/mcimage_adapter if present)")
    p.add_argument("--preset", default=None,
                   help="video: built-in model (toyworld, tiny) or, with --model, the config preset (wan-1.3b, "
                        "wan-14b); image: multicrafter, one-for-all, tiny-multicrafter, tiny-one-for-all")
    p.add_argument("--negative-prompt", default="", help="text of the unconditional guidance passes")
    p.add_argument("--steps", type=integer(1), default=None, help="Euler steps (default: from the model config)")
    p.add_argument("--size", default=None, help="HEIGHTxWIDTH, multiples of 16 (default: from the model config)")
    p.add_argument("--frames", type=integer(1), default=None, help="frame count, 4n+1 (default: from the model config)")
    p.add_argument("--guidance", type=number(), default=None, help="image mode: FLUX distilled guidance scale")
    p.add_argument("--guidance-image", type=number(), default=None, help="s_img, reference guidance scale")
    p.add_argument("--guidance-text", type=number(), default=None, help="s_txt, text guidance scale")
    p.add_argument("--guidance-interval", default=None, metavar="LOW,HIGH",
                   help="run the unconditional and image-only guidance passes only at steps with LOW <= sigma <= HIGH "
                        "(sigma 1 = pure noise); other steps reuse the last guidance term (default: every step)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the initial noise, in [0, 2**64)")
    p.add_argument("--edit-video", default=None, help="editing mode: input video to re-render with the new subjects")
    p.add_argument("--strength", type=number(0, 1, lo_open=True), default=1.0,
                   help="editing strength in (0, 1]; 1 ignores the input video")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="precision of the transformer")
    p.add_argument("--cpu-offload", action="store_true", help="keep components on the CPU until each runs")
    p.add_argument("--sequential-guidance", action="store_true", help="run the 3 guidance passes one by one (less memory)")
    p.add_argument("--vlm", default=None, help="Qwen2.5-VL folder for models trained with the VLM encoder")
    p.add_argument("--sp-size", type=integer(1), default=1,
                   help="sequence parallelism: split one video's tokens over N ranks launched with "
                        "`torchrun --nproc_per_node N` (Ulysses attention); N divides the heads and tokens")
    p.add_argument("--dry-run", action="store_true", help="validate everything and print the plan; generate nothing")
    add_config_argument(p)
    return p


def choose_mode(args: argparse.Namespace) -> str:
    if args.mode is not None:
        return args.mode
    from mcimage.infer import is_image_request

    return "image" if is_image_request(args.preset, args.model, args.adapter) else "video"


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_command_line(parser, argv)
    try:
        mode = choose_mode(args)
        other = VIDEO_ONLY if mode == "image" else IMAGE_ONLY
        given = [k for k in other if getattr(args, k) != parser.get_default(k)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            hint = "" if mode == "image" else " (add --mode image)"
            raise InputError(f"{flag} is not an option of {mode} mode{hint}")
        values = {k: v for k, v in vars(args).items() if k not in ("dry_run", "mode", "config", *other)}
        if mode == "image":
            from mcimage.infer import ImageInferenceRequest, plan, run, validate

            req = ImageInferenceRequest(**values)
        else:
            from idcrafter.video.infer import InferenceRequest, plan, run, validate

            req = InferenceRequest(**values)
        # the library's file and settings errors on the folders and files given name them
        with user_file():
            if args.dry_run:
                validate(req)
                print(plan(req))
                return 0
            timings: dict = {}
            path = run(req) if mode == "image" else run(req, timings)
    except InputError as err:
        return fail(str(err).splitlines()[0])
    if os.environ.get("RANK", "0") != "0":  # the ranks of `--sp-size` share one output and one report
        return 0
    if timings:
        from idcrafter.utils.timing import format_summary

        print(f"timing: {format_summary(timings)}", file=sys.stderr)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
