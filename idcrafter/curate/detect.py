"""Subject detection and tracking (docs/design.md 8.1, stage 4).

`DetectStage` runs a detector backend (Grounding-DINO from category words, or the toy world's
sprite detector) on a candidate's frames in batches and links the detections over frames into
`SubjectTrack`s: per category, the Hungarian assignment on 1 - IoU between each live track's
predicted box (its last box moved by its last velocity) and the frame's detections; an unmatched
detection starts a new track. Tracks present in too few frames are discarded; a candidate with too
few or too many subjects is dropped with a reason.

`KeypointStage` (optional) adds ViTPose body keypoints to the person tracks, for MultiCrafter's
two-person selection (MultiCrafter App. C: person boxes and keypoints before segmentation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from idcrafter.curate.core import Candidate, Detection, Dropped, Outcome, Stage, SubjectTrack, make_backend

__all__ = ["DetectStage", "GroundingDinoDetector", "KeypointStage", "box_iou", "cxcywh_to_pixels",
           "grounding_prompt", "link_tracks", "nms"]


# ---------------------------------------------------------------------------- boxes
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of pixel boxes: a (n, 4), b (m, 4) [x0, y0, x1, y1] -> (n, m); 0 for empty boxes."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def cxcywh_to_pixels(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Normalized (cx, cy, w, h) boxes (..., 4), as DETR-style heads predict them relative to the
    unpadded image, -> pixel [x0, y0, x1, y1] in a frame of `height` x `width`."""
    boxes = np.asarray(boxes, dtype=np.float64)
    cx, cy, w, h = np.moveaxis(boxes, -1, 0)
    return np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], -1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices of the boxes (n, 4) kept by greedy non-maximum suppression, best score first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: list[int] = []
    for i in order:
        if not keep or box_iou(boxes[i], boxes[keep]).max() <= iou:
            keep.append(int(i))
    return np.asarray(keep, dtype=np.int64)


# ---------------------------------------------------------------------------- tracking
def _start(category: str, frames: int) -> dict[str, Any]:
    return {"category": category, "boxes": np.full((frames, 4), np.nan), "scores": np.zeros(frames),
            "last": -1, "velocity": np.zeros(4)}


def _predict(track: dict[str, Any], t: int) -> np.ndarray:
    """The track's box expected at frame t: its last box moved at its last velocity (pixels / frame)."""
    last = track["last"]
    return track["boxes"][last] + track["velocity"] * (t - last)


def link_tracks(per_frame: Sequence[Sequence[Detection]], iou_min: float = 0.3, max_gap: int = 2,
                velocity: bool = True) -> list[SubjectTrack]:
    """Detections per frame -> subject tracks, one per object followed over the frames.

    Per category and frame, the live tracks (seen within the last `max_gap` + 1 frames) are matched
    to the frame's detections by the Hungarian assignment on 1 - IoU between each track's predicted
    box and each detection; a pair needs IoU >= `iou_min`. The prediction extrapolates the last
    velocity (`velocity=False`: the last box), so two subjects whose paths cross keep their ids where
    matching on the last box alone swaps them. An unmatched detection starts a new track. Tracks come in order of first
    appearance; each has boxes (T, 4) with NaN rows where unseen and scores (T,).
    """
    from scipy.optimize import linear_sum_assignment

    frames = len(per_frame)
    tracks: list[dict[str, Any]] = []
    for t, detections in enumerate(per_frame):
        for category in sorted({d.category for d in detections}):
            dets = [d for d in detections if d.category == category]
            boxes = np.stack([np.asarray(d.box, dtype=np.float64) for d in dets])
            live = [k for k, tr in enumerate(tracks) if tr["category"] == category and t - tr["last"] <= max_gap + 1]
            matched: set[int] = set()
            if live:
                iou = box_iou(np.stack([_predict(tracks[k], t) for k in live]), boxes)
                for row, col in zip(*linear_sum_assignment(1.0 - iou)):
                    if iou[row, col] >= iou_min:
                        track = tracks[live[row]]
                        if velocity:
                            track["velocity"] = (boxes[col] - track["boxes"][track["last"]]) / (t - track["last"])
                        track["boxes"][t], track["scores"][t], track["last"] = boxes[col], dets[col].score, t
                        matched.add(int(col))
            for col in range(len(dets)):
                if col not in matched:
                    track = _start(category, frames)
                    track["boxes"][t], track["scores"][t], track["last"] = boxes[col], dets[col].score, t
                    tracks.append(track)
    return [SubjectTrack(category=tr["category"], boxes=tr["boxes"], scores=tr["scores"]) for tr in tracks]


# ---------------------------------------------------------------------------- stage
class DetectStage(Stage):
    """Detect the preset's categories on every frame and keep the subjects tracked over the clip.

    Args:
        categories: the categories to detect: words ("person", "dog", ...) or {category: the words the
            detector reads} ({"upper": "an upper garment"}), handed to a detector with `phrases`.
        detector: a BACKENDS["detector"] name, or an object with `detect(frames, categories)`.
        detector_options: keyword options of the backend (model path, thresholds); `device` is the stage's.
        frame_batch: frames per detector call.
        min_presence: a track must be found in at least this fraction of the frames.
        min_subjects / max_subjects: a candidate with fewer / more kept tracks is dropped (None: no limit).
        iou_min, max_gap: tracking (see `link_tracks`).
        single_subject: One-for-All's single-subject pairs (One-for-All Sec. 3.2, App. H): every
            category found exactly once becomes a candidate of its own (key "<key>-<category>", one
            subject); a category found more than once (several people) is ambiguous and skipped.
    """

    name = "detect"

    def __init__(self, categories: Sequence[str] | Mapping[str, str] = ("person",), detector: Any = "grounding-dino",
                 detector_options: Mapping[str, Any] | None = None, frame_batch: int = 8, min_presence: float = 0.5,
                 min_subjects: int = 1, max_subjects: int | None = None, iou_min: float = 0.3, max_gap: int = 2,
                 single_subject: bool = False, batch_size: int = 1) -> None:
        super().__init__()
        if not categories:
            raise ValueError("DetectStage: categories must name at least one category word")
        if not 0.0 <= min_presence <= 1.0:
            raise ValueError(f"DetectStage: min_presence must be in [0, 1], got {min_presence}")
        if max_subjects is not None and max_subjects < min_subjects:
            raise ValueError(f"DetectStage: max_subjects {max_subjects} < min_subjects {min_subjects}")
        self.categories = list(categories)
        self.phrases = {str(k): str(v) for k, v in categories.items()} if isinstance(categories, Mapping) else {}
        self.single_subject = bool(single_subject)
        self.detector = detector
        self.detector_options = dict(detector_options or {})
        self.frame_batch = max(1, int(frame_batch))
        self.min_presence = float(min_presence)
        self.min_subjects = int(min_subjects)
        self.max_subjects = max_subjects
        self.iou_min = float(iou_min)
        self.max_gap = int(max_gap)
        self.batch_size = int(batch_size)

    def setup(self) -> None:
        if isinstance(self.detector, str):
            self.detector = make_backend("detector", self.detector, device=self.device, **self.detector_options)
        if self.phrases and isinstance(getattr(self.detector, "phrases", None), dict):
            self.detector.phrases = {**self.phrases, **self.detector.phrases}  # the backend's own settings win

    def detections(self, frames: np.ndarray) -> list[list[Detection]]:
        """frames (T, H, W, 3) uint8 -> per frame its detections, `frame_batch` frames a call."""
        out: list[list[Detection]] = []
        for i in range(0, len(frames), self.frame_batch):
            out.extend(self.detector.detect(frames[i:i + self.frame_batch], self.categories))
        return out

    def process(self, batch: list[Candidate]) -> list[Outcome]:
        results: list[Outcome] = []
        for cand in batch:
            if cand.frames is None or len(cand.frames) == 0:
                results.append(Dropped(cand, "no frames"))
                continue
            tracks = link_tracks(self.detections(cand.frames), self.iou_min, self.max_gap)
            kept = [tr for tr in tracks if tr.present().mean() >= self.min_presence]
            cand.info.setdefault("detect", {})["tracks_found"] = len(tracks)
            if not kept:
                results.append(Dropped(cand, "no subject"))
            elif self.single_subject:
                results.extend(self.split(cand, kept))
            elif len(kept) < self.min_subjects:
                results.append(Dropped(cand, "too few subjects"))
            elif self.max_subjects is not None and len(kept) > self.max_subjects:
                results.append(Dropped(cand, "too many subjects"))
            else:
                cand.subjects = kept
                results.append(cand)
        return results

    def split(self, cand: Candidate, tracks: list[SubjectTrack]) -> list[Outcome]:
        """One candidate per category found exactly once (single-subject pairs); frames are shared."""
        counts = {c: sum(t.category == c for t in tracks) for c in {t.category for t in tracks}}
        single = [t for t in tracks if counts[t.category] == 1]
        if not single:
            return [Dropped(cand, "several subjects per category")]
        return [dataclasses.replace(cand, key=f"{cand.key}-{t.category}", subjects=[t], info=dict(cand.info))
                for t in single]


# ---------------------------------------------------------------------------- Grounding-DINO
def grounding_prompt(categories: Sequence[str], phrases: Mapping[str, str] | None = None) -> tuple[str, list[tuple]]:
    """Grounding-DINO's text query and each category's character span in it.

    ["person", "dog"] -> ("a person. a dog.", [(2, 8), (12, 15)]); `phrases` maps a category to the
    words the detector reads ({"upper": "upper garment"}). Lower case, phrases ending in ".", as the
    model was trained (Grounding DINO Sec. 3.4: categories separated by ".").
    """
    text, spans = "", []
    for category in categories:
        phrase = (phrases or {}).get(category, category).strip().lower()
        if not phrase or "." in phrase:
            raise ValueError(f"grounding phrase for {category!r} must be non-empty words without '.', got {phrase!r}")
        prefix = "" if phrase.split()[0] in ("a", "an", "the") else "a "
        start = len(text) + len(prefix)
        text += f"{prefix}{phrase}. "
        spans.append((start, start + len(phrase)))
    return text.strip(), spans


def category_tokens(offsets: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Token indices inside each character span, from a tokenizer's offset mapping ((0, 0) = special)."""
    return [[i for i, (a, b) in enumerate(offsets) if b > a and a >= s and b <= e] for s, e in spans]


class GroundingDinoDetector:
    """Open-vocabulary boxes from category words: transformers' Grounding-DINO loaded from a local folder.

    A query's score for a category is the highest sigmoid text logit over the category's tokens; a
    query is kept for its best category when that score exceeds `box_threshold` (0.35, the Grounding
    DINO demo default), then duplicates of a category are suppressed (NMS at `nms_iou`).

    Args:
        model: folder saved with `save_pretrained` (model, processor, tokenizer); never downloaded.
        phrases: {category: words the detector reads}, e.g. {"upper": "upper garment"}.
    """

    def __init__(self, model: str | None = None, device: str = "cpu", box_threshold: float = 0.35,
                 nms_iou: float = 0.7, phrases: Mapping[str, str] | None = None, dtype: str | None = None) -> None:
        if not model:
            raise ValueError("the grounding-dino detector needs model: a local Grounding-DINO folder "
                             "(backends.detector.model)")
        self.path = Path(model)
        self.device = device
        self.box_threshold = float(box_threshold)
        self.nms_iou = float(nms_iou)
        self.phrases = dict(phrases or {})
        self.dtype = dtype
        self.model = self.processor = None

    def load(self) -> None:
        if self.model is not None:
            return
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        from idcrafter.curate.core import load_local_model

        self.model = load_local_model(GroundingDinoForObjectDetection, self.path, "Grounding-DINO", self.dtype, self.device)
        self.processor = GroundingDinoProcessor.from_pretrained(self.path, local_files_only=True)

    def raw(self, frames: np.ndarray, categories: Sequence[str]):
        """The model's outputs on frames (N, H, W, 3) for the categories' query, the inputs, the token
        indices of each category."""
        import torch

        self.load()
        text, spans = grounding_prompt(categories, self.phrases)
        tokens = category_tokens(self.processor.tokenizer(text, return_offsets_mapping=True)["offset_mapping"], spans)
        inputs = self.processor(images=list(frames), text=[text] * len(frames), return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        return outputs, inputs, tokens

    def detect(self, frames: np.ndarray, categories: Sequence[str]) -> list[list[Detection]]:
        """frames (N, H, W, 3) uint8 -> per frame the detections (pixel boxes) of `categories`."""
        if len(frames) == 0:
            return []
        outputs, _, tokens = self.raw(frames, categories)
        probs = outputs.logits.float().sigmoid().cpu().numpy()  # (N, Q, L)
        per_category = np.stack([probs[..., idx].max(-1) if idx else np.zeros(probs.shape[:2]) for idx in tokens], -1)
        boxes = cxcywh_to_pixels(outputs.pred_boxes.float().cpu().numpy(), *frames.shape[1:3])
        height, width = frames.shape[1:3]
        boxes = np.clip(boxes, 0, [width, height, width, height])
        result = []
        for b, scores in zip(boxes, per_category):  # (Q, 4), (Q, C)
            best, score = scores.argmax(-1), scores.max(-1)
            frame: list[Detection] = []
            for c, category in enumerate(categories):
                rows = np.flatnonzero((best == c) & (score > self.box_threshold))
                for i in rows[nms(b[rows], score[rows], self.nms_iou)]:
                    frame.append(Detection(box=b[i].astype(np.float32), score=float(score[i]), category=category))
            result.append(frame)
        return result


# ---------------------------------------------------------------------------- keypoints
class KeypointStage(Stage):
    """ViTPose body keypoints (COCO 17) for the person tracks (optional; MultiCrafter App. C).

    Fills `track.keypoints` (T, 17, 3) = (x, y, score), NaN where the person is not found; without a
    `model` (a local ViTPose folder) the stage passes candidates through unchanged. With
    `require_face`, a candidate is dropped when a person's nose and both eyes are never all above
    `min_score` in any frame: MultiCrafter verifies identities on faces, so each person must show one.
    """

    name = "keypoints"

    def __init__(self, model: str | None = None, categories: Sequence[str] = ("person",), require_face: bool = False,
                 min_score: float = 0.3, frame_batch: int = 16, batch_size: int = 1) -> None:
        super().__init__()
        self.path = Path(model) if model else None
        self.people = {"person"} if isinstance(categories, Mapping) else set(categories)
        self.require_face = bool(require_face)
        self.min_score = float(min_score)
        self.frame_batch = max(1, int(frame_batch))
        self.batch_size = int(batch_size)
        self.model = self.processor = None

    def setup(self) -> None:
        from transformers import VitPoseForPoseEstimation, VitPoseImageProcessor

        if self.path is None:
            return
        from idcrafter.curate.core import load_local_model

        self.model = load_local_model(VitPoseForPoseEstimation, self.path, "ViTPose", None, self.device)
        self.processor = VitPoseImageProcessor.from_pretrained(self.path, local_files_only=True)

    def keypoints(self, frames: np.ndarray, boxes: list[np.ndarray]) -> list[np.ndarray]:
        """frames (N, H, W, 3), per frame pixel boxes (k, 4) -> per frame (k, 17, 3) (x, y, score)."""
        import torch

        coco = [np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1) for b in boxes]
        inputs = self.processor(images=list(frames), boxes=[c.tolist() for c in coco], return_tensors="pt")
        with torch.inference_mode():
            outputs = self.model(pixel_values=inputs["pixel_values"].to(self.device))
        outputs.heatmaps = outputs.heatmaps.float().cpu()  # decoded on the CPU, in numpy
        poses = self.processor.post_process_pose_estimation(outputs, boxes=[c.tolist() for c in coco])
        return [np.stack([np.concatenate([p["keypoints"].numpy(), p["scores"].numpy()[:, None]], -1) for p in frame])
                for frame in poses]

    def process(self, batch: list[Candidate]) -> list[Outcome]:
        if self.path is None:
            return list(batch)
        results: list[Outcome] = []
        for cand in batch:
            people = [tr for tr in cand.subjects if tr.category in self.people]
            if cand.frames is None or not people:
                results.append(cand)
                continue
            frames = [t for t in range(len(cand.frames)) if any(tr.present()[t] for tr in people)]
            for tr in people:
                tr.keypoints = np.full((len(cand.frames), 17, 3), np.nan)
            for i in range(0, len(frames), self.frame_batch):
                chunk = frames[i:i + self.frame_batch]
                owners = [[tr for tr in people if tr.present()[t]] for t in chunk]
                poses = self.keypoints(cand.frames[chunk], [np.stack([tr.boxes[t] for tr in o]) for t, o in zip(chunk, owners)])
                for t, own, pose in zip(chunk, owners, poses):
                    for tr, kp in zip(own, pose):
                        tr.keypoints[t] = kp
            if self.require_face and any(not face_visible(tr.keypoints, self.min_score) for tr in people):
                results.append(Dropped(cand, "face not visible"))
            else:
                results.append(cand)
        return results


def face_visible(keypoints: np.ndarray, min_score: float) -> bool:
    """Whether some frame of keypoints (T, 17, 3) has the nose and both eyes (COCO 0, 1, 2) above `min_score`."""
    scores = np.nan_to_num(keypoints[:, :3, 2], nan=0.0)
    return bool((scores >= min_score).all(-1).any())
