"""Curation scored against known ground truth: toy raw videos -> curation -> manifest -> metrics
(docs/design.md 8.1, 9).

    python -m idcrafter.toyworld.curation --out runs/curate-toy [--videos 16] [--train-steps 2000]

1. raw: `write_raw_videos` (several shots with hard cuts per video); the ground truth (shot bounds,
   identities, visible masks) goes to a folder curation never reads;
2. curate: `scripts/curate.py --preset idcrafter-video --backend toyworld` when it exists, else
   `curate_minimal` (the same reference / verify stages and toyworld backends behind a minimal
   decode, cut, window and tracking front);
3. evaluate (`evaluate_manifest`): every curated frame is located in the raw videos by its pixels
   (no bookkeeping of the curation run is trusted), then per sample the curated masks are matched
   to the generator's visible masks of that shot (Hungarian on the clip's mask IoU):
   - mask IoU of each curated subject with its match (0 when unmatched): median, 10th percentile;
   - subjects recovered: the ground-truth subjects of all raw shots matched (IoU >= 0.5) in some
     curated sample;
   - identity pairing accuracy: each matched subject's reference, embedded with ToyID, is closest
     to its own ground-truth identity among the identities of its shot;
4. train (--train-steps): `compare_training`, the toy-world model trained at the same budget on
   the curated manifest and on a ground-truth manifest of the same clip windows (true masks,
   references cut from the same kind of frames with true masks), held-out ToyID of both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from idcrafter.curate.core import Candidate, Dropped, Funnel, Outcome, Stage, SubjectTrack, run_stages
from idcrafter.curate.identity import VerifyStage
from idcrafter.curate.references import ReferenceStage, subject_crop
from idcrafter.curate.toyworld import (
    ToyCaptioner,
    ToyDetector,
    ToySegmenter,
    ToyVerifier,
    box_iou,
    load_truth,
    mask_box,
)
from idcrafter.toyworld import world
from idcrafter.utils.io import atomic_write

__all__ = ["MinimalFrontStage", "compare_training", "curate_minimal", "evaluate_manifest", "link_detections",
           "mask_iou_matrix", "write_samples", "write_truth_manifest"]

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# A minimal curation front (decode, cuts, one window per shot, tracking) for the toy world


def hard_cuts(frames: np.ndarray, threshold: float = 12.0) -> list[tuple[int, int]]:
    """Shots as [start, end) ranges: a cut where the mean colour of consecutive frames jumps by
    more than `threshold` levels in some channel (a toy cut changes the whole background)."""
    means = frames.reshape(len(frames), -1, 3).astype(np.float64).mean(axis=1)
    cuts = (np.flatnonzero(np.abs(np.diff(means, axis=0)).max(axis=1) > threshold) + 1).tolist()
    bounds = [0, *cuts, len(frames)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def link_detections(boxes: list[np.ndarray], min_iou: float = 0.3) -> list[np.ndarray]:
    """Per-frame boxes (k_t, 4) -> tracks, each (T, 4) with NaN rows where unseen: Hungarian on
    1 - IoU against each track's last seen box; an unmatched box starts a track."""
    tracks: list[np.ndarray] = []
    last: list[np.ndarray] = []
    T = len(boxes)
    for t, found in enumerate(boxes):
        found = np.asarray(found, np.float64).reshape(-1, 4)
        used = set()
        if tracks and len(found):
            iou = box_iou(np.stack(last), found)
            for r, k in zip(*linear_sum_assignment(1.0 - iou)):
                if iou[r, k] >= min_iou:
                    tracks[r][t], last[r] = found[k], found[k]
                    used.add(int(k))
        for k in range(len(found)):
            if k not in used:
                track = np.full((T, 4), np.nan)
                track[t] = found[k]
                tracks.append(track)
                last.append(found[k])
    return tracks


class MinimalFrontStage(Stage):
    """A decoded toy video (candidate with all its frames) -> one candidate per shot: `num_frames`
    from the middle of the shot, up to `context_frames` frames of the shot outside them; its
    sprites detected, linked over the clip and segmented with the toyworld backends; tracks seen
    in fewer than `min_presence` of the frames are left out. A stand-in for the probe / shots /
    detect / segment stages, so the toy evaluation runs with the toyworld backends alone."""

    name = "front"

    def __init__(self, num_frames: int = 9, context_frames: int = 4, min_presence: float = 0.6,
                 max_subjects: int = world.MAX_SUBJECTS):
        super().__init__()
        self.num_frames, self.context_frames = int(num_frames), int(context_frames)
        self.min_presence, self.max_subjects = float(min_presence), int(max_subjects)
        self.detector, self.segmenter = ToyDetector(), ToySegmenter()

    def split(self, video: Candidate) -> list[Outcome]:
        out = []
        for s, (start, end) in enumerate(hard_cuts(video.frames)):
            key = f"{video.key}-s{s:03d}"
            if end - start < self.num_frames + 1:
                out.append(Dropped(key, "shot too short"))
                continue
            first = start + (end - start - self.num_frames) // 2
            window = np.arange(first, first + self.num_frames)
            outside = [i for i in range(start, end) if i < first or i > window[-1]]
            picks = np.linspace(0, len(outside) - 1, min(self.context_frames, len(outside))).round().astype(int)
            frames = video.frames[window]
            detections = self.detector.detect(frames)
            tracks = [b for b in link_detections([np.stack([d.box for d in f]) if f else np.zeros((0, 4))
                                                  for f in detections])
                      if (~np.isnan(b).any(axis=1)).mean() >= self.min_presence]
            c = Candidate(video.source, key, video.fps, int(first), int(window[-1]) + 1, frames=frames,
                          frame_indices=window, context={outside[p]: video.frames[outside[p]] for p in sorted(set(picks))},
                          info={"shot": s, "shot_range": (start, end)})
            if not tracks:
                out.append(Dropped(c, "no subjects"))
                continue
            if len(tracks) > self.max_subjects:
                out.append(Dropped(c, "too many subjects"))
                continue
            masks = np.zeros((len(tracks), *frames.shape[:3]), bool)
            for t in range(len(frames)):
                seen = [k for k, b in enumerate(tracks) if not np.isnan(b[t]).any()]
                if seen:
                    masks[seen, t] = self.segmenter.segment_frame(frames[t], np.stack([tracks[k][t] for k in seen]))
            c.subjects = [SubjectTrack(world.CATEGORY, b, (~np.isnan(b).any(axis=1)).astype(np.float64), masks=m)
                          for b, m in zip(tracks, masks)]
            out.append(c)
        return out

    def process(self, batch: list[Candidate]) -> list[Outcome]:
        return [o for video in batch for o in self.split(video)]


def _write_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_write(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def write_samples(candidates: list[Candidate], out: str | Path, fps: float = world.FPS) -> Path:
    """Video samples -> out/manifest.jsonl (docs/design.md 8): videos/KEY.mp4, masks/KEY_K.mp4
    (white on black), refs/KEY_K.png; the manifest written last, atomically."""
    from idcrafter.utils.media import write_video

    out = Path(out)
    lines = []
    for c in candidates:
        write_video(c.frames, out / "videos" / f"{c.key}.mp4", fps=fps)
        subjects = []
        for k, s in enumerate(c.subjects):
            write_video(np.repeat(s.masks[..., None].astype(np.uint8) * 255, 3, axis=-1), out / "masks" / f"{c.key}_{k}.mp4",
                        fps=fps)
            _write_png(s.reference, out / "refs" / f"{c.key}_{k}.png")
            subjects.append({"image": f"refs/{c.key}_{k}.png", "mask": f"masks/{c.key}_{k}.mp4", "category": s.category})
        lines.append(json.dumps({"id": c.key, "video": f"videos/{c.key}.mp4", "prompt": c.prompt, "subjects": subjects,
                                 "fps": fps, "split": "train"}))
    manifest = out / "manifest.jsonl"
    with atomic_write(manifest) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))
    return manifest


def curate_minimal(raw: str | Path, out: str | Path, num_frames: int = 9, context_frames: int = 4) -> dict:
    """Curate the raw toy videos with `MinimalFrontStage`, then the reference ("outside-clip")
    and verify (ToyID) stages and the toy captioner -> out/manifest.jsonl, out/report.json
    (the funnel) -> the report."""
    from idcrafter.utils.media import read_video

    out = Path(out)
    funnel = Funnel()
    videos, unreadable = [], []
    for path in sorted(Path(raw).glob("*.mp4")):
        try:
            frames = read_video(path)
        except Exception as err:  # a bad video is reported, never stops the run
            unreadable.append(Dropped(str(path), f"unreadable ({type(err).__name__})", "decode"))
            continue
        videos.append(Candidate(str(path), path.stem, world.FPS, 0, len(frames), frames=frames,
                                frame_indices=np.arange(len(frames))))
    funnel.add("decode", len(videos) + len(unreadable), videos, unreadable, 0.0)
    stages = [MinimalFrontStage(num_frames, context_frames), ReferenceStage(rule="outside-clip"),
              VerifyStage(verifier="toyworld")]
    kept = run_stages(stages, videos, funnel)
    captioner = ToyCaptioner()
    for c in kept:
        c.prompt, descriptors = captioner.caption(c)
    manifest = write_samples(kept, out)
    report = {"manifest": str(manifest), "samples": len(kept), "funnel": funnel.as_dict(),
              "drops": [{"item": d.item if isinstance(d.item, str) else d.item.key, "stage": d.stage, "reason": d.reason}
                        for d in funnel.drops]}
    with atomic_write(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    return report


def curate_command(raw: str | Path, out: str | Path) -> list[str]:
    """The command line of the real curation run on the toy world (scripts/curate.py)."""
    return [sys.executable, str(ROOT / "scripts" / "curate.py"), str(raw), "--out", str(out),
            "--preset", "idcrafter-video", "--backend", "toyworld"]


# ----------------------------------------------------------------------------------------------
# Ground truth at the same windows, and the evaluation


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _load_mask(path: Path, frames: int) -> np.ndarray:
    """A mask file -> bool (T, H, W): luminance > 127 (a PNG mask holds for every frame)."""
    from idcrafter.data.manifest import is_video_path
    from idcrafter.utils.media import read_video

    if is_video_path(path):
        return read_video(path).mean(axis=-1) > 127
    return np.repeat((_load_rgb(path).mean(axis=-1) > 127)[None], frames, axis=0)


def locate_frames(frames: np.ndarray, raw_frames: dict[str, np.ndarray]) -> tuple[str, np.ndarray, float]:
    """Where curated frames (T, H, W, 3) come from: the raw video and frame indices with the
    smallest mean squared pixel difference -> (video id, indices (T,), worst per-frame RMSE)."""
    best = (None, None, np.inf)
    f = frames.astype(np.float32)
    for vid, raw in raw_frames.items():
        if raw.shape[1:] != frames.shape[1:]:
            continue
        err = ((f[:, None] - raw[None].astype(np.float32)) ** 2).mean(axis=(2, 3, 4))  # (T, F)
        idx = err.argmin(axis=1)
        total = float(err[np.arange(len(idx)), idx].mean())
        if total < best[2]:
            best = (vid, idx, total)
    vid, idx, _ = best
    if vid is None:
        return None, None, np.inf
    err = ((f - raw_frames[vid][idx].astype(np.float32)) ** 2).mean(axis=(1, 2, 3))
    return vid, idx, float(np.sqrt(err.max()))


def mask_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Clip-volume IoU of every pair: masks (n, T, H, W), (m, T, H, W) bool -> (n, m)."""
    a2, b2 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    inter = a2 @ b2.T
    union = a2.sum(1)[:, None] + b2.sum(1)[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _identity_crops(shot: dict, raw: np.ndarray) -> list[np.ndarray]:
    """Each ground-truth identity of a shot at the frame where it shows the most pixels."""
    crops = []
    for masks in shot["masks"]:
        t = int(masks.reshape(len(masks), -1).sum(1).argmax())
        crops.append(subject_crop(raw[shot["start"] + t], masks[t]))
    return crops


def evaluate_manifest(manifest: str | Path, raw: str | Path, truth: str | Path, match_iou: float = 0.5,
                      max_rmse: float = 20.0) -> dict:
    """Score a curated manifest against the withheld ground truth (see the module docstring) -> dict."""
    from idcrafter.data.manifest import load_manifest
    from idcrafter.utils.media import read_video

    samples, errors = load_manifest(manifest)
    gt = load_truth(truth)
    raw_frames = {vid: read_video(Path(raw) / f"{vid}.mp4") for vid in gt}
    verifier = ToyVerifier()
    identity_emb = {}
    recovered = {(vid, s, k) for vid, v in gt.items() for s, shot in enumerate(v["shots"])
                 for k in range(len(shot["identities"]))}
    found: set[tuple[str, int, int]] = set()
    ious, pairing, problems, per_sample = [], [], {"unaligned": 0, "crosses a cut": 0}, []
    for sample in samples:
        frames = read_video(sample.video) if sample.is_video else _load_rgb(sample.image)[None]
        vid, idx, rmse = locate_frames(frames, raw_frames)
        if vid is None or rmse > max_rmse:
            problems["unaligned"] += 1
            continue
        shots = gt[vid]["shots"]
        s = next(i for i, shot in enumerate(shots) if shot["start"] <= idx[0] < shot["end"])
        shot = shots[s]
        if not all(shot["start"] <= i < shot["end"] for i in idx):
            problems["crosses a cut"] += 1
            continue
        truth_masks = shot["masks"][:, idx - shot["start"]]
        masks = np.stack([_load_mask(sub.mask, len(frames)) for sub in sample.subjects])
        iou = mask_iou_matrix(masks, truth_masks)
        rows, cols = linear_sum_assignment(-iou)
        match = {int(r): int(k) for r, k in zip(rows, cols) if iou[r, k] >= match_iou}
        if (vid, s) not in identity_emb:
            identity_emb[(vid, s)] = verifier.embed(_identity_crops(shot, raw_frames[vid]))
        refs = verifier.embed([_load_rgb(sub.image) for sub in sample.subjects])
        sample_ious = []
        for r in range(len(sample.subjects)):
            sample_ious.append(float(iou[r, match[r]]) if r in match else 0.0)
            if r in match:
                found.add((vid, s, match[r]))
                sims = np.nan_to_num(identity_emb[(vid, s)] @ np.nan_to_num(refs[r]), nan=-1.0)
                pairing.append(int(sims.argmax()) == match[r])
        ious += sample_ious
        per_sample.append({"id": sample.id, "video": vid, "shot": s, "frames": [int(idx[0]), int(idx[-1]) + 1],
                           "subjects": len(sample.subjects), "truth_subjects": len(shot["identities"]),
                           "mask_iou": [round(x, 4) for x in sample_ious]})
    ious = np.asarray(ious)
    return {
        "samples": len(samples), "bad_lines": len(errors), **problems,
        "subjects": int(len(ious)),
        "mask_iou_median": float(np.median(ious)) if len(ious) else None,
        "mask_iou_p10": float(np.percentile(ious, 10)) if len(ious) else None,
        "truth_subjects": len(recovered), "recovered": len(found & recovered),
        "recovered_fraction": len(found & recovered) / max(len(recovered), 1),
        "pairing_accuracy": float(np.mean(pairing)) if pairing else None,
        "per_sample": per_sample,
    }


def write_truth_manifest(raw: str | Path, truth: str | Path, out: str | Path, num_frames: int = 9,
                         context_frames: int = 4) -> Path:
    """The ground-truth manifest of the windows `MinimalFrontStage` takes (the middle `num_frames`
    of every shot long enough): the generator's visible masks, references cut with the true mask
    from the context frame furthest from the clip (the curated references' rule), prompts from
    the true boxes in the toy captioner's language -> out/manifest.jsonl."""
    from idcrafter.utils.media import read_video

    gt = load_truth(truth)
    candidates = []
    captioner = ToyCaptioner()
    for vid, video in gt.items():
        frames = read_video(Path(raw) / f"{vid}.mp4")
        for s, shot in enumerate(video["shots"]):
            start, end = shot["start"], shot["end"]
            if end - start < num_frames + 1:
                continue
            first = start + (end - start - num_frames) // 2
            window = np.arange(first, first + num_frames)
            furthest = start if first - start >= end - window[-1] - 1 else end - 1
            tracks = []
            for masks in shot["masks"]:
                clip = masks[window - start]
                boxes = np.stack([mask_box(m) if m.any() else np.full(4, np.nan) for m in clip])
                track = SubjectTrack(world.CATEGORY, boxes, np.ones(num_frames), masks=clip)
                track.reference = subject_crop(frames[furthest], masks[furthest - start])
                tracks.append(track)
            if any(t.reference is None for t in tracks):
                continue
            c = Candidate(vid, f"{vid}-s{s:03d}", world.FPS, int(first), int(window[-1]) + 1, frames=frames[window],
                          frame_indices=window, subjects=tracks)
            c.prompt = captioner.caption(c)[0]
            candidates.append(c)
    return write_samples(candidates, out)


# ----------------------------------------------------------------------------------------------
# Training at the same budget


def compare_training(out: str | Path, manifests: dict[str, str | Path], steps: int, batch_size: int = 8,
                     lr: float = 5e-4, seed: int = 0, eval_samples: int = 64, limit: int = 32,
                     attn_loss_weight: float = 0.3) -> dict:
    """The toy-world model trained from the same base, for the same steps, on each manifest
    ({"curated": ..., "truth": ...}) -> {name: held-out ToyID summary}, also written to
    out/training.json. Each run's data, cache and checkpoints go to out/<name>; the held-out clips
    are the toy world's held-out pool; the recipe is `idcrafter.toyworld.build`'s (full fine-tuning,
    IDAR on the masks at `attn_loss_weight`)."""
    from idcrafter.rewards.toyid import DEFAULT_TOYID_PATH
    from idcrafter.toyworld import build
    from idcrafter.toyworld.evaluate import evaluate_model

    out = Path(out)
    held = out / "held_out" / "manifest.jsonl"
    if not held.is_file():
        from idcrafter.video.config import IDCrafterConfig

        world.write_dataset(held.parent, eval_samples, seed=seed + 1, pool="held_out",
                            num_frames=IDCrafterConfig.from_preset("toyworld").num_frames)
    base = build.step_base(out, seed)
    results = {}
    for name, manifest in manifests.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        build.log(f"{name}: cache and train {steps} steps on {manifest}")
        cache = build.step_cache(folder, base, Path(manifest))
        run = build.step_train(folder, base, Path(manifest), steps, batch_size, lr, seed,
                               extra=["--attn-loss-weight", str(attn_loss_weight)], cache=cache)
        model = build.assemble_model(folder, base, run)
        results[name] = evaluate_model(model, held, DEFAULT_TOYID_PATH, limit=limit, seed=seed)["summary"]
    with atomic_write(out / "training.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv=None) -> int:
    from idcrafter.utils.cli import ArgumentParser

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/curate-toy")
    p.add_argument("--videos", type=int, default=16, help="raw toy videos (2-3 shots each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-frames", type=int, default=9, help="frames per curated clip (4n+1)")
    p.add_argument("--via", choices=["auto", "cli", "minimal"], default="auto",
                   help="curate with scripts/curate.py (cli), curate_minimal, or the first that exists (auto)")
    p.add_argument("--train-steps", type=int, default=0, help="also train on curated vs ground truth (0: no)")
    args = p.parse_args(argv)
    out = Path(args.out)
    started = time.perf_counter()
    raw, truth = out / "raw", out / "truth"
    if not (truth / "truth.json").is_file():
        from idcrafter.curate.toyworld import write_raw_videos

        write_raw_videos(out, args.videos, seed=args.seed)
    via = args.via
    if via == "auto":
        via = "cli" if (ROOT / "scripts" / "curate.py").is_file() else "minimal"
    curated = out / "curated"
    if via == "cli":
        subprocess.run(curate_command(raw, curated), check=True)
    else:
        curate_minimal(raw, curated, num_frames=args.num_frames)
    metrics = evaluate_manifest(curated / "manifest.jsonl", raw, truth)
    metrics["via"] = via
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    with atomic_write(out / "eval.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1) + "\n")
    summary = {k: v for k, v in metrics.items() if k != "per_sample"}
    print(json.dumps(summary, indent=1))
    if args.train_steps > 0:
        truth_manifest = write_truth_manifest(raw, truth, out / "truth_manifest", num_frames=args.num_frames)
        print(json.dumps(compare_training(out / "training", {"curated": curated / "manifest.jsonl",
                                                               "truth": truth_manifest}, args.train_steps), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
