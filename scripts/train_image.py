#!/usr/bin/env python
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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idcrafter.cli.train_image import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
