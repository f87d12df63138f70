"""Serve the web demo: a Gradio page with a video tab (ID-Crafter) and an image tab (MultiCrafter /
One-for-All).

    python -m idcrafter.demo                      # the built-in toy models, http://127.0.0.1:7860
    idcrafter-demo --model Wan2.1-T2V-1.3B-Diffusers --adapter runs/idcrafter/adapter --device cuda \\
        --image-model FLUX.1-dev --image-adapter runs/mcimage/adapter

Model options are those of `scripts/infer.py` (`--image-*` for the image tab); without them each tab
runs the built-in model, so the page works on any CPU. The options are checked and each model is
loaded once, before the page is served (a bad folder is one line on stderr, exit 2); requests then
queue and run one at a time per model. Every request's references, output and the command that
reproduces it with `scripts/infer.py` stay in `--work-dir` (default: a new temporary folder).
"""

from __future__ import annotations

import argparse
import sys

from idcrafter.utils.cli import ArgumentParser, InputError, fail, integer, user_file
from idcrafter.utils.settings_file import add_config_argument, parse_command_line


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="video tab: Wan 2.1 diffusers folder (default: the built-in toy model)")
    p.add_argument("--adapter", default=None, help="video tab: ID-Crafter adapter folder")
    p.add_argument("--preset", default=None, help="video tab: preset, as scripts/infer.py --preset")
    p.add_argument("--vlm", default=None, help="video tab: Qwen2.5-VL folder of models trained with the VLM encoder")
    p.add_argument("--image-model", default=None, help="image tab: FLUX diffusers folder (default: the built-in model)")
    p.add_argument("--image-adapter", default=None, help="image tab: MultiCrafter / One-for-All adapter folder")
    p.add_argument("--image-preset", default=None, help="image tab: multicrafter, one-for-all, tiny-multicrafter, ...")
    p.add_argument("--tabs", nargs="+", choices=("video", "image"), default=["video", "image"],
                   help="the tabs to serve (each loads its model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="precision of the transformers")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=integer(1, 65535), default=7860, help="port to serve on")
    p.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    p.add_argument("--work-dir", default=None, help="folder for each request's references and outputs")
    add_config_argument(p)
    return p


def main(argv=None) -> int:
    args = parse_command_line(build_parser(), argv)
    try:
        from idcrafter.demo.service import DemoModel, ImageService, VideoService
        from idcrafter.utils.deps import MissingDependencyError, require

        try:
            require("gradio")
        except MissingDependencyError as err:
            raise InputError(str(err)) from None
        if args.vlm is not None and "video" not in args.tabs:
            raise InputError("--vlm is an option of the video tab (add --tabs video)")
        video = image = None
        with user_file():
            if "video" in args.tabs:
                video = VideoService(DemoModel(args.model, args.adapter, args.preset, args.vlm, args.device, args.dtype),
                                     work_dir=args.work_dir)
            if "image" in args.tabs:
                image = ImageService(DemoModel(args.image_model, args.image_adapter, args.image_preset, None,
                                               args.device, args.dtype), work_dir=args.work_dir)
    except InputError as err:
        return fail(str(err).splitlines()[0])
    from idcrafter.demo.app import CSS, build_demo

    for name, service in (("video", video), ("image", image)):
        if service is not None:
            print(f"loading the {name} model ...", file=sys.stderr, flush=True)
            service.load()
    demo = build_demo(video, image)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS,
                    allowed_paths=[str(s.work_dir) for s in (video, image) if s is not None])
    except OSError as err:  # the port is taken, or the address is not this machine's
        return fail(f"--host {args.host} --port {args.port}: cannot serve there ({err})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
