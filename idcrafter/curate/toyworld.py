"""The toy world as curation backends and as raw footage whose ground truth is known (docs/design.md 8.1, 9).

Backends (`--backend toyworld`, registered in `idcrafter.curate.core.BACKENDS`):
- `ToyDetector`: sprites are the connected regions that differ from the frame's border colour
  (`idcrafter.toyworld.metrics.detect_sprites`), a region too big for one sprite split at its
  distance-to-edge peaks, one `Detection` per region;
- `ToySegmenter`: a box's mask is the region of the frame it covers best; one region claimed by
  several boxes (touching sprites) is split between them, each pixel going to the nearest box;
- `ToyVerifier`: the ToyID embedder (the toy world's ArcFace) on the sprite of a crop;
- `ToyCaptioner`: the toy world's own prompt language (`describe_clip`) from the tracks' boxes.

Raw footage: `make_raw_video` strings several toy clips together with hard cuts (a new background
and a new set of identities per shot); `write_raw_videos` writes the videos to one folder and their
ground truth (shot bounds, identities, visible masks, boxes) to another, so the pipeline never
sees it and `idcrafter.toyworld.curation` can score what curation recovered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idcrafter.curate.core import Candidate, Detection, SubjectTrack
from idcrafter.toyworld import world
from idcrafter.utils.io import atomic_write

__all__ = ["RawShot", "RawVideo", "ToyCaptioner", "ToyDetector", "ToySegmenter", "ToyVerifier", "box_iou",
           "estimate_motion", "load_truth", "make_raw_video", "mask_box", "split_region", "write_raw_videos"]


def mask_box(mask: np.ndarray) -> np.ndarray:
    """bool (H, W) -> float [x0, y0, x1, y1] pixel box with exclusive ends (the generator's convention)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of pixel boxes: (n, 4), (m, 4) -> (n, m); 0 for empty or NaN boxes."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return np.nan_to_num(iou, nan=0.0)


# ----------------------------------------------------------------------------------------------
# Backends


def split_region(region: np.ndarray, peak_distance: int, peak_rel: float = 0.5) -> list[np.ndarray]:
    """Touching sprites -> one region each: a watershed of the distance to the region's edge from
    its peaks (at least `peak_distance` px apart, at least `peak_rel` of the highest); a region
    with one peak comes back whole. bool (H, W) -> list of bool (H, W)."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    depth = ndimage.distance_transform_edt(region)
    peaks = peak_local_max(depth, min_distance=max(2, int(peak_distance)), threshold_rel=peak_rel,
                           labels=region.astype(np.int32), exclude_border=False)
    if len(peaks) < 2:
        return [region]
    markers = np.zeros(region.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-depth, markers, mask=region)
    return [labels == i for i in range(1, len(peaks) + 1)]


class ToyDetector:
    """Detector backend: one `Detection` per sprite region, largest first.

    Regions are the connected areas that differ from the border colour (`detect_sprites`:
    threshold / min_area / max_sprites). Sprites that touch or overlap form one region; a region
    wider or taller than one sprite can be (`max_sprite` of the frame side; toy sprites are 35-45%)
    is split by `split_region` (peaks `peak_distance` of the frame side apart, `peak_rel`). On toy
    raw videos this finds 83% of the visible subjects' boxes at IoU > 0.5 instead of 64%, at the
    cost of splitting a single sprite in 7% of the frames (short tracks the tracker drops).

    The score is 1: the regions are found by a colour threshold, not a classifier. The category
    is the toy world's ("toy") when asked for, else the first word asked for (toy sprites are all
    one kind of thing).
    """

    def __init__(self, threshold: float = 40.0, min_area: int = 24, max_sprites: int = 6, split: bool = True,
                 max_sprite: float = 0.47, peak_distance: float = 0.12, peak_rel: float = 0.5, device: str = "cpu"):
        self.threshold, self.min_area, self.max_sprites = float(threshold), int(min_area), int(max_sprites)
        self.split, self.max_sprite = bool(split), float(max_sprite)
        self.peak_distance, self.peak_rel = float(peak_distance), float(peak_rel)

    def regions(self, frame: np.ndarray) -> list[np.ndarray]:
        """uint8 (H, W, 3) -> the frame's sprite regions, bool (H, W) each, largest first."""
        from idcrafter.toyworld.metrics import detect_sprites

        found = detect_sprites(frame, self.threshold, self.min_area, self.max_sprites)
        if not self.split:
            return found
        side = max(frame.shape[:2])
        out = []
        for region in found:
            x0, y0, x1, y1 = mask_box(region)
            if max(x1 - x0, y1 - y0) > self.max_sprite * side:
                out += [r for r in split_region(region, self.peak_distance * side, self.peak_rel)
                        if r.sum() >= self.min_area]
            else:
                out.append(region)
        return sorted(out, key=lambda r: -int(r.sum()))[:self.max_sprites]

    def detect(self, frames: np.ndarray, categories: list[str] | tuple[str, ...] = (world.CATEGORY,)) -> list[list[Detection]]:
        """frames (N, H, W, 3) uint8 -> per frame the detections, boxes [x0, y0, x1, y1] (exclusive ends)."""
        category = world.CATEGORY if not categories or world.CATEGORY in categories else categories[0]
        return [[Detection(mask_box(m), 1.0, category) for m in self.regions(f)] for f in frames]


class ToySegmenter:
    """Segmenter backend: a box's mask is the sprite region of the frame that fits it best (box IoU
    >= `min_iou`, else an empty mask). Touching sprites form one region; when several boxes pick
    the same region, each of its pixels goes to the box whose centre is nearest among those that
    contain it (or all boxes, for pixels in none), so the masks of one frame never overlap."""

    def __init__(self, threshold: float = 40.0, min_area: int = 24, max_sprites: int = 6, split: bool = True,
                 min_iou: float = 0.2, device: str = "cpu"):
        self.detector = ToyDetector(threshold, min_area, max_sprites, split)
        self.min_iou = float(min_iou)

    def segment_frame(self, frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """frame (H, W, 3), boxes (k, 4) -> (k, H, W) bool."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        out = np.zeros((len(boxes), *frame.shape[:2]), bool)
        regions = self.detector.regions(frame)
        if not regions or not len(boxes):
            return out
        iou = box_iou(boxes, np.stack([mask_box(r) for r in regions]))
        choice = np.where(iou.max(axis=1) >= self.min_iou, iou.argmax(axis=1), -1)
        for r in set(choice.tolist()) - {-1}:
            owners = np.flatnonzero(choice == r)
            if len(owners) == 1:
                out[owners[0]] = regions[r]
                continue
            ys, xs = np.nonzero(regions[r])
            b = boxes[owners]
            inside = (xs[:, None] >= b[:, 0]) & (xs[:, None] < b[:, 2]) & (ys[:, None] >= b[:, 1]) & (ys[:, None] < b[:, 3])
            centre = (b[:, :2] + b[:, 2:]) / 2.0
            dist = np.hypot(xs[:, None] + 0.5 - centre[:, 0], ys[:, None] + 0.5 - centre[:, 1])
            dist = np.where(inside | ~inside.any(axis=1, keepdims=True), dist, np.inf)
            winner = owners[dist.argmin(axis=1)]
            for k in owners:
                sel = winner == k
                out[k, ys[sel], xs[sel]] = True
        return out

    def segment(self, frames: np.ndarray, boxes: list[np.ndarray]) -> list[np.ndarray]:
        """frames (N, H, W, 3), boxes per frame (k_i, 4) -> per frame (k_i, H, W) bool."""
        return [self.segment_frame(f, b) for f, b in zip(frames, boxes)]


class ToyVerifier:
    """Verifier backend: ToyID embeddings (unit, 64-d) of the sprite in each crop.

    A crop is a subject on white (as `idcrafter.curate.references.subject_crop` cuts it); it is
    padded with white so the border colour the sprite finder keys on is the background. A crop
    with no sprite gives a NaN row. path: a folder saved by `ToyIDEmbedder.save` (default: the
    shipped one). `threshold`: the lowest cosine `VerifyStage` accepts by default; on toy raw
    clips ToyID puts views of one identity above ~0.78 and different identities below ~0.6.
    """

    threshold = 0.65

    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 256):
        from idcrafter.rewards.toyid import DEFAULT_TOYID_PATH

        self.path = Path(path) if path is not None else DEFAULT_TOYID_PATH
        if not (self.path / "toyid.json").is_file():
            raise ValueError(f"toyworld verifier: {self.path} has no toyid.json (a folder saved by ToyIDEmbedder.save)")
        self.device, self.batch_size = device, int(batch_size)
        self._scorer = None

    def load(self):
        if self._scorer is None:
            from idcrafter.toyworld.embedder import ToyIDEmbedder
            from idcrafter.toyworld.metrics import ToyIDScorer

            self._scorer = ToyIDScorer(ToyIDEmbedder.load(self.path), self.device)
        return self._scorer

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """crops: (h, w, 3) uint8 -> (n, 64) float unit rows, NaN rows where no sprite is found."""
        from idcrafter.toyworld.embedder import crop_to_box
        from idcrafter.toyworld.metrics import detect_sprites

        scorer = self.load()
        out = np.full((len(crops), scorer.embedder.dim), np.nan, np.float32)
        ready, rows = [], []
        for i, crop in enumerate(crops):
            if crop is None or crop.size == 0:
                continue
            padded = np.pad(np.asarray(crop, np.uint8), ((2, 2), (2, 2), (0, 0)), constant_values=255)
            regions = detect_sprites(padded, min_area=8)
            if regions:
                ready.append(crop_to_box(padded, regions[0]))
                rows.append(i)
        for i in range(0, len(ready), self.batch_size):
            out[rows[i:i + self.batch_size]] = scorer.embed(ready[i:i + self.batch_size]).numpy()
        return out


def estimate_motion(track: SubjectTrack, size: int, still_px: float = 2.0, depth: int = 0) -> world.Motion:
    """A constant-velocity `Motion` fitted to a track's boxes (first and last frame where present).

    still_px: a displacement below this many pixels is "still"; a direction within a factor 2 of
    an axis is along that axis, else diagonal (the toy world's motion kinds).
    """
    present = np.flatnonzero(track.present())
    if not len(present):
        raise ValueError("the track is never present")
    first, last = track.boxes[present[0]], track.boxes[present[-1]]
    side = int(max(1, round(float(np.median(np.max(track.boxes[present, 2:] - track.boxes[present, :2], axis=1))))))
    dx, dy = (last[:2] - first[:2]).tolist()
    if max(abs(dx), abs(dy)) < still_px:
        kind = "still"
    elif abs(dx) >= 2 * abs(dy):
        kind = "left_to_right" if dx > 0 else "right_to_left"
    elif abs(dy) >= 2 * abs(dx):
        kind = "down" if dy > 0 else "up"
    else:
        kind = f"{'down' if dy > 0 else 'up'}_{'right' if dx > 0 else 'left'}"
    return world.Motion(kind, (float(first[0]), float(first[1])), (float(last[0]), float(last[1])), side, depth=depth)


def _overlap_pairs(subjects: list[SubjectTrack], min_fraction: float = 0.05) -> list[tuple[int, int]]:
    """(front, back) pairs whose boxes overlap by >= `min_fraction` of the smaller box in some frame;
    the one whose mask covers more of the shared box is in front (the other is hidden there)."""
    pairs = []
    for a in range(len(subjects)):
        for b in range(a + 1, len(subjects)):
            ba, bb = subjects[a].boxes, subjects[b].boxes
            front = 0.0
            overlap = False
            for t in range(len(ba)):
                if np.isnan(ba[t]).any() or np.isnan(bb[t]).any():
                    continue
                x0, y0 = np.maximum(ba[t, :2], bb[t, :2]).astype(int)
                x1, y1 = np.minimum(ba[t, 2:], bb[t, 2:]).astype(int)
                if x1 <= x0 or y1 <= y0:
                    continue
                smaller = min(np.prod(ba[t, 2:] - ba[t, :2]), np.prod(bb[t, 2:] - bb[t, :2]))
                if (x1 - x0) * (y1 - y0) < min_fraction * smaller:
                    continue
                overlap = True
                if subjects[a].masks is not None and subjects[b].masks is not None:
                    front += subjects[a].masks[t, y0:y1, x0:x1].sum() - subjects[b].masks[t, y0:y1, x0:x1].sum()
            if overlap:
                pairs.append((a, b) if front >= 0 else (b, a))
    return pairs


class ToyCaptioner:
    """Captioner backend: the toy world's prompt (`world.describe_clip`: count, each subject's
    motion by ordinal in subject order, who is in front) from the tracks' boxes and masks. Toy
    prompts never name what a subject looks like, so there are no item descriptors (None each)."""

    def __init__(self, still_px: float = 2.0, device: str = "cpu"):
        self.still_px = float(still_px)

    def caption(self, candidate: Candidate) -> tuple[str, list[str | None]]:
        subjects = candidate.subjects[:world.MAX_SUBJECTS]
        if not subjects:
            raise ValueError(f"candidate {candidate.key} has no subjects to describe")
        size = int(candidate.size[1])
        motions = [estimate_motion(s, size, self.still_px) for s in subjects]
        return world.describe_clip(motions, size, _overlap_pairs(subjects)), [None] * len(candidate.subjects)


# ----------------------------------------------------------------------------------------------
# Raw footage with withheld ground truth


@dataclass(frozen=True, eq=False)
class RawShot:
    """One shot of a raw video: frames [start, end) of the video, its identities (keys) and the
    generator's clip (visible masks bool (N, F, H, W), boxes (N, F, 4), motions)."""

    start: int
    end: int
    identities: tuple[str, ...]
    clip: world.Clip


@dataclass(frozen=True, eq=False)
class RawVideo:
    id: str
    frames: np.ndarray
    shots: tuple[RawShot, ...]


def _distinct_background(size: int, rng: np.random.Generator, previous: np.ndarray | None, min_diff: float) -> np.ndarray:
    """A toy background whose mean colour differs from the previous shot's by >= `min_diff` levels
    (up to 50 draws), so a cut changes the whole frame, as cuts between real shots do."""
    best, best_diff = None, -1.0
    for _ in range(50):
        background = world.make_background(size, rng)
        if previous is None:
            return background
        diff = float(np.abs(background.mean(axis=(0, 1)) - previous.mean(axis=(0, 1))).max())
        if diff >= min_diff:
            return background
        if diff > best_diff:
            best, best_diff = background, diff
    return best


def make_raw_video(index: int, seed: int, pool: str = "train", shots: tuple[int, int] = (2, 3),
                   shot_frames: tuple[int, ...] = (25, 33, 41), size: int = 64,
                   subjects: tuple[int, int] = (1, 3), min_background_diff: float = 20.0) -> RawVideo:
    """Raw video `index`: 2-3 shots (hard cuts), each 1-3 identities of `pool` moving over its own
    background; no identity appears in two shots. Shot lengths are drawn from `shot_frames` (4n+1
    frames each, as toy clips are). Deterministic in (seed, pool, index)."""
    rng = world.sample_rng(seed + 7919, pool, index)  # its own streams: never the dataset's samples
    candidates = world.split_pools()[world.POOLS.index(pool)]
    count = int(rng.integers(shots[0], shots[1] + 1))
    chosen = [candidates[int(i)] for i in rng.choice(len(candidates), size=count * subjects[1], replace=False)]
    parts, out, start, background = [], [], 0, None
    for s in range(count):
        n = int(rng.integers(subjects[0], subjects[1] + 1))
        identities = chosen[s * subjects[1]: s * subjects[1] + n]
        length = int(rng.choice(shot_frames))
        background = _distinct_background(size, rng, background, min_background_diff)
        clip = world.make_clip(identities, length, size, rng, background=background)
        parts.append(clip.frames)
        out.append(RawShot(start, start + length, tuple(i.key for i in identities), clip))
        start += length
    return RawVideo(f"raw-{pool}-{index:04d}", np.concatenate(parts), tuple(out))


def write_raw_videos(folder: str | Path, num_videos: int, seed: int, pool: str = "train", **options) -> tuple[Path, Path]:
    """Write `num_videos` raw videos -> (folder/raw, folder/truth).

    raw/<id>.mp4: the videos (H.264, the toy world's 8 fps), all curation gets to see.
    truth/<id>.npz: per shot k, `masks_k` (N, F, H, W) bool and `boxes_k` (N, F, 4);
    truth/truth.json: per video its shots (start, end, identity keys, motions), the generator
    options. Withheld from curation; `idcrafter.toyworld.curation` reads it to score the result.
    """
    from idcrafter.utils.media import write_video

    folder = Path(folder)
    raw, truth = folder / "raw", folder / "truth"
    records = {}
    for index in range(num_videos):
        video = make_raw_video(index, seed, pool, **options)
        write_video(video.frames, raw / f"{video.id}.mp4", fps=world.FPS)
        arrays = {}
        for k, shot in enumerate(video.shots):
            arrays[f"masks_{k}"] = shot.clip.masks
            arrays[f"boxes_{k}"] = shot.clip.boxes
        with atomic_write(truth / f"{video.id}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        records[video.id] = {"frames": int(len(video.frames)), "shots": [
            {"start": s.start, "end": s.end, "identities": list(s.identities),
             "motions": [m.to_dict() for m in s.clip.motions]} for s in video.shots]}
    meta = {"seed": seed, "pool": pool, "fps": world.FPS, "options": {k: list(v) if isinstance(v, tuple) else v
                                                                       for k, v in options.items()},
            "videos": records}
    with atomic_write(truth / "truth.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    return raw, truth


def load_truth(truth: str | Path) -> dict[str, dict]:
    """truth folder -> {video id: {"frames", "shots": [{"start", "end", "identities", "masks", "boxes"}]}}."""
    truth = Path(truth)
    meta = json.loads((truth / "truth.json").read_text())
    out = {}
    for vid, record in meta["videos"].items():
        arrays = np.load(truth / f"{vid}.npz")
        shots = [dict(s, masks=arrays[f"masks_{k}"], boxes=arrays[f"boxes_{k}"]) for k, s in enumerate(record["shots"])]
        out[vid] = {"frames": record["frames"], "shots": shots}
    return out
