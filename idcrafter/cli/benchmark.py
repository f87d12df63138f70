"""Benchmarks: ratios measured side by side in one run (new vs. stock, new vs. naive).

    python scripts/benchmark.py attention [--device cuda] [--full] [--json out.json]
    python scripts/benchmark.py video-overhead [--stage3-projections attn2 own] [--device meta] | video-step-cache
    python scripts/benchmark.py lora [--quick]
    python scripts/benchmark.py image-idar [--config flux-dev|small|tiny] [--quick] [--share-chunk 64 1024]
    python scripts/benchmark.py toyworld --root runs/toyworld --steps 1000 [--rows c_full e_full_attn2_proj] [--seed 1]
    python scripts/benchmark.py toyimage --out runs/toyimage --steps 1500
    python scripts/benchmark.py gpu-suite [--peak-tflops 989] [--json out.json]   (one GPU; --quick: tiny on CPU)

CPU sizes by default; on a CUDA device the full-size shapes are used unless --no-full.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from idcrafter.benchmarks import load_cases
from idcrafter.utils.cli import ArgumentParser, fail, number
from idcrafter.utils.io import atomic_write
from idcrafter.video.config import STAGE3_PROJECTIONS


def main(argv=None) -> int:
    cases = load_cases()
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=sorted(cases), help="; ".join(f"{n}: {c.help}" for n, c in sorted(cases.items())))
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available); "
                        "video-overhead also takes meta: counted FLOPs of the full-size model, no times")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=None,
                        help="full-size shapes (default: on for CUDA, off for CPU)")
    parser.add_argument("--chunk-size", type=int, default=256, help="query chunk of ref_attention_share")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument("--config", default=None, help="image-idar: flux-dev, small or tiny (default: flux-dev on CUDA, else small)")
    parser.add_argument("--quick", action="store_true", help="image-idar, lora, gpu-suite, video-overhead: tiny sizes (seconds, for tests)")
    parser.add_argument("--stage3-projections", nargs="+", choices=STAGE3_PROJECTIONS, default=list(STAGE3_PROJECTIONS),
                        help="video-overhead: the stage-3 forms to time side by side (default: both)")
    parser.add_argument("--share-chunk", type=int, nargs="+", default=[],
                        help="image-idar: extra IDAR rows with these share query chunks (memory vs chunk)")
    parser.add_argument("--root", type=Path, default=Path("runs/toyworld"), help="toyworld: the toy-world build folder")
    parser.add_argument("--out", type=Path, default=None, help="toyworld: where the row runs go (default ROOT/ablation); toyimage: its folder (default runs/toyimage)")
    parser.add_argument("--steps", type=int, default=1000, help="toyworld: training steps of every row")
    parser.add_argument("--rows", nargs="+", default=[], metavar="ROW", help="toyworld: the rows to train (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="toyworld: training and evaluation seed")
    parser.add_argument("--peak-tflops", type=number(0, lo_open=True), default=None,
                        help="gpu-suite: peak dense TFLOP/s of the GPU for MFU (default: known GPUs' bf16 peak)")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return fail(f"--device {device}: CUDA is not available on this machine")
    if device == "meta" and args.case != "video-overhead":
        return fail(f"--device meta: only video-overhead runs without computing (FLOPs), not {args.case}")
    if args.chunk_size <= 0 or args.repeats <= 0 or any(c <= 0 for c in args.share_chunk):
        return fail("--chunk-size, --repeats and --share-chunk must be positive")
    case = cases[args.case]
    try:
        report = case.run(device=device, full=args.full, chunk_size=args.chunk_size, repeats=args.repeats,
                          root=args.root, out=args.out, steps=args.steps, config=args.config, quick=args.quick,
                          share_chunk=args.share_chunk, peak_tflops=args.peak_tflops, rows=tuple(args.rows), seed=args.seed,
                          stage3_projections=tuple(args.stage3_projections))
    except (ValueError, FileNotFoundError) as err:
        return fail(str(err))
    print(case.format_table(report))
    if args.json:
        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
