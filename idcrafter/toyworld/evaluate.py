"""Evaluate a toy-world model on held-out identities with ToyID.

For each held-out sample the model generates a video from the sample's prompt and references.
ToyID scores it against its own references ("matched") and against the references of another
sample with the same number of subjects ("shuffled"); the ground-truth clips are scored the
same way as a ceiling. Matched well above shuffled means the identities come from the references.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from idcrafter.toyworld.embedder import ToyIDEmbedder
from idcrafter.toyworld.metrics import ToyIDScorer


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def shuffled_partner(counts: list[int], i: int) -> int:
    """The next sample (cyclically) with the same number of subjects, or i itself if none."""
    n = len(counts)
    for step in range(1, n):
        j = (i + step) % n
        if counts[j] == counts[i]:
            return j
    return i


def evaluate_model(model: str | Path, manifest: str | Path, toyid: str | Path, limit: int = 32, seed: int = 0,
                   steps: int | None = None, pipe=None, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from idcrafter.data.manifest import load_manifest
    from idcrafter.data.video import load_clip
    from idcrafter.video.pipeline import IDCrafterPipeline

    samples, errors = load_manifest(manifest)
    if errors:
        raise ValueError(f"{manifest}: {len(errors)} bad lines, first: {errors[0]}")
    samples = samples[:limit]
    if pipe is None:
        pipe = IDCrafterPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    scorer = ToyIDScorer(ToyIDEmbedder.load(toyid))
    refs = [[_load_rgb(s.image) for s in sample.subjects] for sample in samples]
    counts = [len(r) for r in refs]
    rows = []
    for i, sample in enumerate(tqdm(samples, desc="eval", disable=not progress)):
        cfg = pipe.config_idc
        frames = pipe(sample.prompt, [s.image for s in sample.subjects], generator=torch.Generator().manual_seed(seed + i),
                      num_inference_steps=steps).frames[0]
        frames = (frames * 255).round().astype(np.uint8)
        truth = load_clip(sample.video, cfg.num_frames, cfg.fps)
        rows.append(_score_row(scorer, sample.id, frames, truth, refs, counts, i))
    return {"summary": _mean_row(rows), "samples": rows, "limit": limit, "seed": seed}


def _score_row(scorer: ToyIDScorer, sample_id: str, frames: np.ndarray, truth: np.ndarray, refs: list, counts: list[int],
               i: int) -> dict:
    """ToyID of sample i's generated frames and ground-truth clip (uint8 [F, H, W, 3]) against its own
    references and against its shuffled partner's."""
    other = refs[shuffled_partner(counts, i)]
    return {
        "id": sample_id, "subjects": counts[i],
        **{f"gen_{k}": v for k, v in scorer.score(frames, refs[i]).items()},
        **{f"gen_shuffled_{k}": v for k, v in scorer.score(frames, other).items()},
        **{f"truth_{k}": v for k, v in scorer.score(truth, refs[i]).items()},
        **{f"truth_shuffled_{k}": v for k, v in scorer.score(truth, other).items()},
    }


def _mean_row(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k not in ("id", "subjects")]
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def score_files(videos: list[Path], manifest: str | Path, toyid: str | Path, fps: float, seed: int = 0) -> dict:
    """`evaluate_model`'s matched / shuffled / truth ToyID, on videos already rendered (one per
    manifest sample, in manifest order; decoded from the files). Imports no generator.

    fps: the model's frame rate, at which the ground-truth clips are sampled (as many frames as
    each video has).
    """
    from idcrafter.data.manifest import load_manifest
    from idcrafter.data.video import load_clip
    from idcrafter.utils.media import read_video

    samples, errors = load_manifest(manifest)
    if errors:
        raise ValueError(f"{manifest}: {len(errors)} bad lines, first: {errors[0]}")
    if len(samples) != len(videos):
        raise ValueError(f"{len(videos)} videos for the {len(samples)} samples of {manifest}")
    scorer = ToyIDScorer(ToyIDEmbedder.load(toyid))
    refs = [[_load_rgb(s.image) for s in sample.subjects] for sample in samples]
    counts = [len(r) for r in refs]
    rows = []
    for i, (sample, path) in enumerate(zip(samples, videos)):
        frames = read_video(path)
        truth = load_clip(sample.video, len(frames), fps)
        rows.append(_score_row(scorer, sample.id, frames, truth, refs, counts, i))
    return {"summary": _mean_row(rows), "samples": rows, "limit": len(samples), "seed": seed}
