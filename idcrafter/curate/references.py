"""Reference images cut from frames that are not the training target (docs/design.md 8.1).

A model that sees its target's own pixels as the reference learns to copy and paste them, so a
reference always comes from another moment of the same shot:
- rule "first-middle" (MultiCrafter, App. data preparation: "we sample an initial frame as the
  source for reference images and a middle frame as the target scene"): references from the
  candidate's first frame; the candidate is cut down to its middle frame, the image sample;
- rule "context" (ID-Crafter Sec. 3.4 / App. B: subject-video pairs, the reference taken outside
  the sampled clip): references from `Candidate.context`, frames of the same shot outside the clip.
  The subject is found there with the detector and segmenter backends: its box is extrapolated
  from the track (constant velocity) to the context frame, matched to the detections (Hungarian
  on 1 - IoU), segmented, and the context frame where it shows the most pixels is used.
Each reference is the masked subject on white, a square around its mask; for people (categories
in `face_categories`) a face crop from the same frame as well (MultiCrafter saves "the segmented
portraits and cropped faces from the initial frame" as references).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment

from idcrafter.curate.core import Candidate, Dropped, Outcome, Stage, SubjectTrack, make_backend
from idcrafter.curate.toyworld import box_iou

__all__ = ["PERSON_CATEGORIES", "ReferenceStage", "extrapolate_box", "face_crop", "subject_crop", "target_frames"]

PERSON_CATEGORIES = ("person", "man", "woman", "boy", "girl", "child", "face")


def subject_crop(frame: np.ndarray, mask: np.ndarray | None = None, box: np.ndarray | None = None,
                 pad: float = 0.1, size: int | None = None) -> np.ndarray | None:
    """The masked subject on white, in a square around its mask (or box) -> (s, s, 3) uint8.

    frame (H, W, 3) uint8; mask (H, W) bool (pixels outside it become white); box [x0, y0, x1, y1]
    when there is no mask (the whole box is kept). pad: margin as a fraction of the longer side.
    The square is centred on the subject and may reach past the frame (filled white). size: resize
    to size x size. None when the mask is empty and there is no box.
    """
    if mask is not None and mask.any():
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        image = np.where(mask[..., None], frame, 255).astype(np.uint8)
    elif box is not None and not np.isnan(box).any():
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        image = frame
    else:
        return None
    side = max(int(np.ceil(max(x1 - x0, y1 - y0) * (1 + 2 * pad))), 1)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    tx, ty = cx - side // 2, cy - side // 2
    canvas = np.full((side, side, 3), 255, np.uint8)
    h, w = image.shape[:2]
    sx0, sy0, sx1, sy1 = max(tx, 0), max(ty, 0), min(tx + side, w), min(ty + side, h)
    if sx0 < sx1 and sy0 < sy1:
        canvas[sy0 - ty:sy1 - ty, sx0 - tx:sx1 - tx] = image[sy0:sy1, sx0:sx1]
    if size is not None and side != size:
        canvas = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC))
    return canvas


def face_crop(frame: np.ndarray, box: np.ndarray, margin: float = 0.3) -> np.ndarray:
    """A square crop around a face box, `margin` of its side added on every side (hair, chin),
    clipped to the frame -> (h, w, 3) uint8."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    h, w = frame.shape[:2]
    a, b = int(max(cx - side / 2, 0)), int(max(cy - side / 2, 0))
    c, d = int(min(cx + side / 2, w)), int(min(cy + side / 2, h))
    return np.ascontiguousarray(frame[b:d, a:c])


def extrapolate_box(track: SubjectTrack, frame_indices: np.ndarray, index: int) -> np.ndarray:
    """The track's box at source frame `index`, by a least-squares line through its boxes (the
    subject moving at constant velocity) -> [x0, y0, x1, y1]; a track seen once keeps that box."""
    present = track.present()
    t = np.asarray(frame_indices, np.float64)[present]
    boxes = track.boxes[present]
    if len(t) < 2 or np.ptp(t) == 0:
        return boxes[0].astype(np.float64)
    design = np.stack([t, np.ones_like(t)], axis=1)
    coef, *_ = np.linalg.lstsq(design, boxes, rcond=None)
    return np.array([index, 1.0]) @ coef


def target_frames(candidate: Candidate) -> set[int]:
    """Source indices of the frames the training target is made of: the candidate's frames and
    its clip range [start, end)."""
    indices = set(range(int(candidate.start), int(candidate.end)))
    if candidate.frame_indices is not None:
        indices.update(int(i) for i in candidate.frame_indices)
    return indices


def _slice_track(track: SubjectTrack, t: int) -> None:
    """Keep only frame position `t` of a track's per-frame arrays (in place)."""
    track.boxes = track.boxes[t:t + 1]
    track.scores = track.scores[t:t + 1]
    if track.masks is not None:
        track.masks = track.masks[t:t + 1]
    if track.keypoints is not None:
        track.keypoints = track.keypoints[t:t + 1]


class ReferenceStage(Stage):
    """References for every subject, from frames that are not the target (see the module docstring).

    Options: rule ("context" | "first-middle"), size (side of the reference square; None: as
    cut), pad (margin around the subject), detector / segmenter (backend names for the context
    rule, with detector_options / segmenter_options), categories (words for the detector; default
    the subjects' own), min_iou (a context detection must overlap the extrapolated box this much),
    face_categories (subjects that also get a face crop), face_backend ("dlib" | "insightface",
    with face_options), require_face (drop a person whose reference frame shows no face).
    Drops: "no frame outside the clip", "subject not in the reference frame", "no face in the
    reference frame".
    """

    name = "references"

    def __init__(self, rule: str = "context", size: int | None = None, pad: float = 0.1,
                 detector: str = "toyworld", segmenter: str = "toyworld", detector_options: dict | None = None,
                 segmenter_options: dict | None = None, categories: Sequence[str] | None = None,
                 min_iou: float = 0.1, face_categories: Sequence[str] = PERSON_CATEGORIES,
                 face_backend: str = "dlib", face_options: dict | None = None, require_face: bool = False,
                 batch_size: int = 8, device: str = "cpu"):
        super().__init__()
        if rule not in ("context", "first-middle"):
            raise ValueError(f"references: rule must be 'context' or 'first-middle', got {rule!r}")
        if size is not None and int(size) < 8:
            raise ValueError(f"references: size must be >= 8, got {size}")
        self.rule, self.size, self.pad = rule, None if size is None else int(size), float(pad)
        self.detector_name, self.segmenter_name = detector, segmenter
        self.detector_options, self.segmenter_options = dict(detector_options or {}), dict(segmenter_options or {})
        self.categories = None if categories is None else list(categories)
        self.min_iou = float(min_iou)
        self.face_categories = frozenset(face_categories)
        self.face_backend_name, self.face_options = face_backend, dict(face_options or {})
        self.require_face = bool(require_face)
        self.batch_size, self.device = int(batch_size), device
        self.detector = self.segmenter = self.faces = None

    def setup(self) -> None:
        if self.rule == "context":
            self.detector = make_backend("detector", self.detector_name, device=self.device, **self.detector_options)
            self.segmenter = make_backend("segmenter", self.segmenter_name, device=self.device, **self.segmenter_options)

    def _face_backend(self):
        if self.faces is None:
            from idcrafter.rewards.faces import make_face_backend

            self.faces = make_face_backend(self.face_backend_name, self.device, **self.face_options)
        return self.faces

    def _set_reference(self, track: SubjectTrack, frame: np.ndarray, mask: np.ndarray | None, box: np.ndarray,
                       source_index: int) -> str | None:
        """Cut the reference (and a face for people) from `frame`; a drop reason or None."""
        track.reference = subject_crop(frame, mask, box, self.pad, self.size)
        if track.reference is None:
            return "subject not in the reference frame"
        track.reference_frame = int(source_index)
        if track.category in self.face_categories:
            region = np.nan_to_num(box).astype(int)
            x0, y0 = max(region[0], 0), max(region[1], 0)
            faces = self._face_backend().detect(np.ascontiguousarray(frame[y0:region[3], x0:region[2]]))
            best = faces.largest()
            if best is None:
                if self.require_face:
                    return "no face in the reference frame"
            else:
                track.face = face_crop(frame, faces.boxes[best] + np.array([x0, y0, x0, y0], np.float32))
        return None

    def _first_middle(self, c: Candidate) -> Outcome:
        if c.frames is None or len(c.frames) < 2:
            return Dropped(c, "fewer than 2 frames for reference and target")
        mid = len(c.frames) // 2
        indices = c.frame_indices if c.frame_indices is not None else np.arange(c.start, c.start + len(c.frames))
        for track in c.subjects:
            if not (track.present()[0] and track.present()[mid]):
                return Dropped(c, "subject not in the reference frame")
            mask = None if track.masks is None else track.masks[0]
            reason = self._set_reference(track, c.frames[0], mask, track.boxes[0], int(indices[0]))
            if reason:
                return Dropped(c, reason)
            _slice_track(track, mid)
        c.frames = c.frames[mid:mid + 1]
        c.frame_indices = np.asarray(indices[mid:mid + 1])
        c.start, c.end = int(indices[mid]), int(indices[mid]) + 1
        c.info["reference_rule"] = self.rule
        return c

    def _context(self, c: Candidate) -> Outcome:
        target = target_frames(c)
        context = sorted(i for i in c.context if int(i) not in target)
        if not context:
            return Dropped(c, "no frame outside the clip")
        indices = c.frame_indices if c.frame_indices is not None else np.arange(c.start, c.start + len(c.frames))
        frames = np.stack([c.context[i] for i in context])
        categories = self.categories or sorted({s.category for s in c.subjects})
        detections = self.detector.detect(frames, categories)
        # per subject: (visible pixels, distance from the clip, context position, box, mask) of its best view
        best: list[tuple | None] = [None] * len(c.subjects)
        for j, (index, found) in enumerate(zip(context, detections)):
            if not found:
                continue
            predicted = np.stack([extrapolate_box(s, indices, index) for s in c.subjects])
            boxes = np.stack([np.asarray(d.box, np.float64) for d in found])
            iou = box_iou(predicted, boxes)
            rows, cols = linear_sum_assignment(1.0 - iou)
            keep = [(r, k) for r, k in zip(rows, cols) if iou[r, k] >= self.min_iou]
            if not keep:
                continue
            masks = self.segmenter.segment(frames[j:j + 1], [boxes[[k for _, k in keep]]])[0]
            distance = min(abs(index - int(c.start)), abs(index - (int(c.end) - 1)))
            for (r, k), mask in zip(keep, masks):
                view = (int(mask.sum()), distance, j, boxes[k], mask)
                if mask.any() and (best[r] is None or view[:2] > best[r][:2]):
                    best[r] = view
        for track, view in zip(c.subjects, best):
            if view is None:
                return Dropped(c, "subject not in the reference frame")
            _, _, j, box, mask = view
            reason = self._set_reference(track, frames[j], mask, box, context[j])
            if reason:
                return Dropped(c, reason)
        c.info["reference_rule"] = self.rule
        return c

    def process(self, batch: list[Candidate]) -> list[Outcome]:
        out = []
        for c in batch:
            if not c.subjects:
                out.append(Dropped(c, "no subjects"))
                continue
            result = self._first_middle(c) if self.rule == "first-middle" else self._context(c)
            if isinstance(result, Candidate):
                # the rule of this stage: a reference never comes from the target's frames
                assert all(s.reference_frame not in target_frames(result) for s in result.subjects)
            out.append(result)
        return out
