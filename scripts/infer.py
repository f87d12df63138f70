#!/usr/bin/env python
"""Generate one video of the given subjects with ID-Crafter, or one image with MultiCrafter / One-for-All.

    python scripts/infer.py --refs A.png B.png --prompt "..." --out out.mp4
    python scripts/infer.py --mode image --refs A.png B.png --categories face upper \
        --prompt "a man <face>with short hair</face> in <upper>a red hoodie</upper>" --out out.png

Without --model the built-in default model runs on the CPU in seconds: the toy-world model
shipped in idcrafter/assets/toyworld (a small ID-Crafter trained with this code on synthetic
toy identities, 64x64, 9 frames; it draws toy sprites such as examples/*.png, not people), or,
in a checkout without it, the `tiny` preset with random weights (noise-like output). --preset
tiny forces the random one. For real results pass --model (a Wan 2.1 diffusers folder) and
--adapter (an ID-Crafter adapter folder from training).

Image mode is chosen by --mode image, by an image preset (multicrafter, one-for-all,
tiny-multicrafter, tiny-one-for-all), or by --model / --adapter folders of the image branch (a
FLUX pipeline, or one with mcimage_adapter/). Without --model it runs the built-in image model:
the tiny-multicrafter preset with random weights unless --preset picks the other tiny one.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idcrafter.cli.infer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
