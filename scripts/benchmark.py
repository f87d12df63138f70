#!/usr/bin/env python
"""Benchmarks: ratios measured side by side in one run (new vs. stock, new vs. naive).

    python scripts/benchmark.py attention [--device cuda] [--full] [--json out.json]
    python scripts/benchmark.py video-overhead | video-step-cache
    python scripts/benchmark.py image-idar [--config flux-dev|small|tiny] [--quick] [--share-chunk 64 1024]
    python scripts/benchmark.py toyworld --root runs/toyworld --steps 1000
    python scripts/benchmark.py toyimage --out runs/toyimage --steps 1500

CPU sizes by default; on a CUDA device the full-size shapes are used unless --no-full.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idcrafter.cli.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
