#!/usr/bin/env python
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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idcrafter.cli.analyze_routing import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
