#!/usr/bin/env python
"""Render many videos and images from a JSONL job file, resumably, across processes, GPUs and nodes.

    python scripts/render_batch.py --jobs jobs.jsonl --out DIR [--model WAN_DIR --adapter ADAPTER]
    torchrun --nproc_per_node 8 scripts/render_batch.py --jobs jobs.jsonl --out DIR ...
    deepspeed --num_gpus 8 scripts/render_batch.py --jobs jobs.jsonl --out DIR ...

One job per line: {"prompt", "refs": [paths relative to the job file], "output": "name.mp4",
"seed"?, "size"?: "HxW", "frames"?, "negative_prompt"?, "steps"?, "guidance_image"?,
"guidance_text"?}. An output ending in .png / .jpg (or "mode": "image") makes an image job,
rendered by the image branch (MultiCrafter / One-for-All) with "categories"?: one per ref and
"guidance_text" as the FLUX guidance. The image model is --image-model / --image-adapter /
--image-preset (default: the built-in tiny image model), or --model / --adapter / --preset when
those name the image branch (an image preset, a FLUX folder, an mcimage adapter); such a run has
no video model. Each rank (RANK / WORLD_SIZE from the launcher) renders its own share;
finished outputs are skipped on a rerun; every output is written under a temporary name and
renamed when complete. Bad lines are reported with their line numbers in DIR/summary.json and
the other jobs still run. Every output is decoded (frame count and size) before it counts as
finished. Several processes may share DIR: each output is rendered by one of them, and
DIR/summary.json holds the results of all that ran at the same time.

Bad input (a missing, empty or wholly invalid job file, an --out that is a file or cannot be
written, an unknown --device or --dtype, a bad model folder) is one line `error: ...` and exit
code 2, before any folder is created or model loaded.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idcrafter.cli.render_batch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
