#!/usr/bin/env python
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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idcrafter.cli.cache_features import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
