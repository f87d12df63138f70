"""Encode a training manifest once (VAE latents, reference latents, UMT5 states) into a feature cache.

    python scripts/cache_features.py --preset wan-1.3b --base Wan2.1-T2V-1.3B-Diffusers \\
        --data data/train.jsonl --out cache/ --frames 81 --size 480x832 [--device cuda] [--vlm QWEN_DIR]
    deepspeed scripts/train_video.py ... --cache cache/ [--vlm QWEN_DIR]  # training reads the encodings

With --vlm the cache also holds the Qwen2.5-VL states of the three inputs training's condition
dropout gives the VLM (prompt and references, references alone, prompt alone), so a run from a
complete cache never loads the VLM; a --vlm run refuses a cache built without it or with another.

The cache records the settings it was built with; a training run with other settings refuses it.
Rerunning continues where it stopped (samples already cached are skipped).
"""

from __future__ import annotations

import argparse
import json
import sys

from idcrafter.utils.cli import ArgumentParser, InputError, fail, integer, seed, user_file
from idcrafter.utils.settings_file import add_config_argument, parse_command_line


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--base", default=None, help="Wan 2.1 diffusers folder (default: random init of the preset)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--frames", type=integer(1), default=None)
    p.add_argument("--fps", type=integer(1, 240), default=16)
    p.add_argument("--size", default=None, help="HEIGHTxWIDTH")
    p.add_argument("--seed", type=seed, default=0, help="init seed of a random base (must match training)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--vlm", default=None, help="Qwen2.5-VL folder: cache its states too (train with the same --vlm)")
    add_config_argument(p)
    args = parse_command_line(p, argv)

    from idcrafter.utils.cli import check_device, check_input_file, check_output_dir, parse_size
    from idcrafter.utils.folders import check_model_folder
    from idcrafter.video.config import PRESETS

    try:
        if args.preset not in PRESETS:
            raise InputError(f"--preset {args.preset!r} is unknown; known presets: {', '.join(sorted(PRESETS))}")
        check_input_file(args.data, "--data")
        check_output_dir(args.out, "--out")
        check_device(args.device)
        if args.base is not None:
            check_model_folder(args.base, "--base", required=("transformer", "vae", "text_encoder", "tokenizer"))
        if args.vlm is not None:
            from idcrafter.video.infer import vlm_hidden_size

            vlm_hidden_size(args.vlm)
        if args.frames is not None and (args.frames - 1) % 4:
            raise InputError(f"--frames {args.frames}: must be 4n+1")
        height, width = parse_size(args.size, multiple=16) if args.size else (None, None)

        import torch

        from idcrafter.video.training import VideoDataArgs, VideoModelArgs, VideoTrainingSpec

        with user_file():  # the library's messages name --data, --base, --out and their files
            spec = VideoTrainingSpec(
                VideoModelArgs(preset=args.preset, base=args.base, init_seed=args.seed, vlm=args.vlm),
                VideoDataArgs(data=args.data, num_frames=args.frames, fps=args.fps, height=height, width=width),
            )
            spec.load_samples()
            device = torch.device(args.device)
            spec.build_model(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
            counts = spec.build_cache(args.out, device)
    except InputError as err:
        return fail(str(err))
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
