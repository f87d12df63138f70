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
        other = refs[shuffled_partner(counts, i)]
        rows.append({
            "id": sample.id, "subjects": counts[i],
            **{f"gen_{k}": v for k, v in scorer.score(frames, refs[i]).items()},
            **{f"gen_shuffled_{k}": v for k, v in scorer.score(frames, other).items()},
            **{f"truth_{k}": v for k, v in scorer.score(truth, refs[i]).items()},
            **{f"truth_shuffled_{k}": v for k, v in scorer.score(truth, other).items()},
        })
    keys = [k for k in rows[0] if k not in ("id", "subjects")]
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    return {"summary": summary, "samples": rows, "limit": limit, "seed": seed}
