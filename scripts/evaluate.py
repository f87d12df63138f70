#!/usr/bin/env python
"""Score generated videos / images on a benchmark manifest (FaceSim, NexusScore, CLIP-T, CLIP-I,
DINO-I, Aesthetic, NaturalScore, ToyID, Motion, Leakage and an OpenS2V-style weighted total).

    python scripts/evaluate.py --data bench.jsonl --videos outputs/ --out runs/eval \\
        --model-option face.backend=dlib --model-option clip_text.path=/models/clip
    python scripts/evaluate.py --data bench.jsonl --videos a.mp4 b.mp4 c.png --out runs/eval
    python scripts/evaluate.py --toyworld [--model FOLDER] [--samples 8] --out runs/eval_toy

Files in a --videos folder are matched to samples by id (<id>.mp4, <id>.png); a list of files is
taken in manifest order. A reward whose model is not given or cannot load is skipped with its
reason. Writes per_sample.csv, summary.json, table.md (also printed) and summary.png to --out.
Weights and normalisation ranges: idcrafter/eval/metrics.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idcrafter.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
