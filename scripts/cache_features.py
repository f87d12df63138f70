#!/usr/bin/env python
"""Encode a training manifest once (VAE latents, reference latents, UMT5 states) into a feature cache.

    python scripts/cache_features.py --preset wan-1.3b --base Wan2.1-T2V-1.3B-Diffusers \\
        --data data/train.jsonl --out cache/ --frames 81 --size 480x832 [--device cuda]
    deepspeed scripts/train_video.py ... --cache cache/     # training reads the encodings from it

The cache records the settings it was built with; a training run with other settings refuses it.
Rerunning continues where it stopped (samples already cached are skipped).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from idcrafter.utils.cli import InputError, fail  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--base", default=None, help="Wan 2.1 diffusers folder (default: random init of the preset)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--size", default=None, help="HEIGHTxWIDTH")
    p.add_argument("--seed", type=int, default=0, help="init seed of a random base (must match training)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import torch

    from idcrafter.utils.cli import parse_size
    from idcrafter.video.config import PRESETS
    from idcrafter.video.training import VideoDataArgs, VideoModelArgs, VideoTrainingSpec

    try:
        if args.preset not in PRESETS:
            raise InputError(f"--preset {args.preset!r} is unknown; known presets: {', '.join(sorted(PRESETS))}")
        if not Path(args.data).is_file():
            raise InputError(f"--data {args.data} does not exist")
        height, width = parse_size(args.size) if args.size else (None, None)
        spec = VideoTrainingSpec(
            VideoModelArgs(preset=args.preset, base=args.base, init_seed=args.seed),
            VideoDataArgs(data=args.data, num_frames=args.frames, fps=args.fps, height=height, width=width),
        )
        device = torch.device(args.device)
        spec.build_model(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        counts = spec.build_cache(args.out, device)
    except InputError as err:
        return fail(str(err))
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
