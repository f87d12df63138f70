"""ToyID and time of the guidance interval on held-out toy identities (`scripts/benchmark.py guidance-interval`).

Every row renders the same held-out samples with the same seeds and step count with the built-in
toy-world model (`idcrafter.video.defaults.TOYWORLD_MODEL`), full guidance or the guidance passes
limited to a sigma interval (`idcrafter.video.guidance`), and scores each video with ToyID against
its own references. The rows of one sample run one after another, so the shared CPU's load falls
on all of them alike. `passes` is the transformer rows per video relative to full guidance (three
per guided step, one per other step).

    python -m idcrafter.toyworld.guidance_interval --samples 32 --json runs/guidance_interval.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from idcrafter.video.guidance import GuidanceInterval, as_interval, guided_steps

# Rows of the measurement; the toy model's 20 shifted sigmas are 1, .98, .96, .94, .92, .90, .88, .85,
# .82, .79, .75, .71, .67, .62, .56, .50, .43, .35, .25, .14.
INTERVALS: tuple[GuidanceInterval | None, ...] = (
    None,
    GuidanceInterval(0.25, 0.95),  # the paper's shape: no guidance at the highest noise
    GuidanceInterval(0.0, 0.8),
    GuidanceInterval(0.5, 1.0),  # guidance while the layout forms, reused after
    GuidanceInterval(0.7, 1.0),
    GuidanceInterval(0.85, 1.0),
    GuidanceInterval(0.0, 0.0),  # no step guided: the conditional pass alone, i.e. guidance off
)


def row_name(interval: GuidanceInterval | None) -> str:
    return "full" if interval is None else f"[{interval.low:g}, {interval.high:g}]"


def pass_share(sigmas, interval: GuidanceInterval | None) -> float:
    """Transformer rows per video relative to full three-pass guidance."""
    guided = guided_steps(sigmas, interval)
    return (3 * sum(guided) + (len(guided) - sum(guided))) / (3 * len(guided))


def measure(intervals=INTERVALS, samples: int = 32, seed: int = 0, steps: int | None = None, pipe=None,
            toyid: str | Path | None = None, progress: bool = True) -> dict:
    """One row per interval: ToyID mean / min (averaged over samples), its change against full
    guidance on the same sample, s/video and the transformer-row share."""
    from tqdm.auto import tqdm

    from idcrafter.data.manifest import load_manifest
    from idcrafter.toyworld.embedder import ToyIDEmbedder
    from idcrafter.toyworld.evaluate import _load_rgb
    from idcrafter.toyworld.metrics import ToyIDScorer
    from idcrafter.toyworld.world import write_dataset
    from idcrafter.video.defaults import TOYWORLD_MODEL
    from idcrafter.video.pipeline import IDCrafterPipeline

    pipe = pipe or IDCrafterPipeline.from_pretrained(TOYWORLD_MODEL)
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.config_idc
    steps = steps or cfg.num_inference_steps
    scorer = ToyIDScorer(ToyIDEmbedder.load(toyid or TOYWORLD_MODEL.parent / "toyid"))
    names = [row_name(i) for i in intervals]
    scores = {n: [] for n in names}
    seconds = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="idcrafter-interval-") as tmp:
        manifest = write_dataset(tmp, samples, seed=seed, pool="held_out", num_frames=cfg.num_frames, size=cfg.height)
        items, _ = load_manifest(manifest)
        for i, sample in enumerate(tqdm(items, desc="samples", disable=not progress)):
            paths = [s.image for s in sample.subjects]
            refs = [_load_rgb(p) for p in paths]
            for name, interval in zip(names, intervals):
                start = time.perf_counter()
                frames = pipe(sample.prompt, paths, generator=torch.Generator().manual_seed(seed + i),
                              num_inference_steps=steps, guidance_interval=interval).frames[0]
                seconds[name].append(time.perf_counter() - start)
                scores[name].append(scorer.score((frames * 255).round().astype(np.uint8), refs))
    sigmas = pipe.scheduler.sigmas[:-1].tolist()  # the schedule of the last call: `steps` steps
    full = scores[names[0]]
    rows = []
    for name, interval in zip(names, intervals):
        mean = [s["toyid_mean"] for s in scores[name]]
        low = [s["toyid_min"] for s in scores[name]]
        rows.append({
            "interval": name, "guided_steps": sum(guided_steps(sigmas, interval)), "passes": pass_share(sigmas, interval),
            "toyid_mean": float(np.mean(mean)), "toyid_min": float(np.mean(low)),
            "delta_mean": float(np.mean(np.subtract(mean, [s["toyid_mean"] for s in full]))),
            "delta_min": float(np.mean(np.subtract(low, [s["toyid_min"] for s in full]))),
            "s_per_video": float(np.mean(seconds[name])),
        })
    return {"rows": rows, "samples": samples, "seed": seed, "steps": steps, "sigmas": sigmas,
            "guidance_image": cfg.guidance_image, "guidance_text": cfg.guidance_text}


def format_table(report: dict) -> str:
    lines = [f"ToyID on {report['samples']} held-out toy samples, {report['steps']} steps, seed {report['seed']}, "
             f"s_img {report['guidance_image']:g}, s_txt {report['guidance_text']:g}",
             "| interval | guided steps | passes | ToyID mean | ToyID min | d mean | d min | s/video |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['interval']} | {r['guided_steps']}/{report['steps']} | {r['passes']:.2f} | {r['toyid_mean']:.3f} "
                     f"| {r['toyid_min']:.3f} | {r['delta_mean']:+.3f} | {r['delta_min']:+.3f} | {r['s_per_video']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32, help="held-out samples (each rendered once per row)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples; sample i's noise is seed + i")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--intervals", nargs="+", default=None, metavar="LOW,HIGH",
                   help="rows besides full guidance (default: the built-in rows)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    intervals = INTERVALS if args.intervals is None else (None, *(as_interval(v) for v in args.intervals))
    report = measure(intervals, samples=args.samples, seed=args.seed, steps=args.steps)
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
