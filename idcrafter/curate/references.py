"""Reference images cut from frames that are not the training target (docs/design.md 8.1).

A model that sees its target's own pixels as the reference learns to copy and paste them, so a
reference always comes from another moment of the same shot:
- rule "first-frame" (MultiCrafter, App. C: "we sample an initial frame as the source for
  reference images and a middle frame as the target scene"): references from the shot's first
  frame (the candidate's context frame, as the `shots` stage's image mode leaves it; or, for a
  candidate of several frames, its own first frame, the candidate then being cut down to its
  middle frame);
- rule "outside-clip" (ID-Crafter Sec. 3.4 / App. B: subject-video pairs, the reference taken
  outside the sampled clip): references from `Candidate.context`, frames of the same shot outside
  the clip, the view where the subject shows best.
In a context frame the subject is found with the detector and segmenter backends: its box is
extrapolated from the track (constant velocity) to that frame, matched to the detections
(`match_subjects`) and segmented.
Each reference is the masked subject on white, a square around its mask; for people (categories
in `face_categories`) a face crop from the same frame as well (MultiCrafter saves "the segmented
portraits and cropped faces from the initial frame" as references).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment

from idcrafter.curate.core import Candidate, Dropped, Outcome, Stage, SubjectTrack, make_backend
from idcrafter.curate.toyworld import box_iou

__all__ = ["PERSON_CATEGORIES", "ReferenceStage", "extrapolate_box", "face_crop", "match_subjects", "shared_face_backend",
           "subject_crop", "target_frames"]

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


_FACE_BACKENDS: dict[str, object] = {}


def shared_face_backend(name: str, device: str = "cpu", **options):
    """The face backend (`idcrafter.rewards.faces.make_face_backend`) for these settings, built
    once per process: the reference and verify stages share it (dlib's models take seconds to load)."""
    from idcrafter.rewards.faces import make_face_backend

    key = repr((name, str(device), sorted(options.items())))
    if key not in _FACE_BACKENDS:
        _FACE_BACKENDS[key] = make_face_backend(name, device, **options)
    return _FACE_BACKENDS[key]


def _backend(kind: str, spec, device: str, options: dict):
    """A backend given by registered name (built here, on `device`) or as a built instance."""
    if isinstance(spec, str):
        return make_backend(kind, spec, device=device, **options)
    return spec


def match_subjects(predicted: np.ndarray, found: np.ndarray, diagonal: float, min_iou: float,
                   max_shift: float) -> list[tuple[int, int]]:
    """Subjects (predicted boxes (n, 4)) to detections (boxes (m, 4)) -> [(subject, detection)].

    Hungarian on (1 - IoU) + centre distance / frame diagonal, one detection per subject; a pair
    is kept when the boxes overlap by `min_iou` or their centres are within `max_shift` of the
    diagonal (a subject that moved further than its own size between the two frames)."""
    if not len(predicted) or not len(found):
        return []
    iou = box_iou(predicted, found)
    centre_p = (predicted[:, :2] + predicted[:, 2:]) / 2
    centre_f = (found[:, :2] + found[:, 2:]) / 2
    shift = np.linalg.norm(centre_p[:, None] - centre_f[None], axis=-1) / max(diagonal, 1.0)
    rows, cols = linear_sum_assignment(1.0 - iou + shift)
    return [(int(r), int(k)) for r, k in zip(rows, cols) if iou[r, k] >= min_iou or shift[r, k] <= max_shift]


class ReferenceStage(Stage):
    """References for every subject, from frames that are not the target (see the module docstring).

    Options: rule ("outside-clip": the best view among the context frames; "first-frame": the
    candidate's first frame when it has several (it is then cut to its middle frame), else its
    earliest context frame), size (side of the reference square; None: as cut), pad (margin
    around the subject), detector / segmenter (backend names or built backends, to find subjects
    in context frames; options for named ones in detector_options / segmenter_options),
    categories (the category names the detector is asked for; default the subjects' own),
    min_iou / max_shift (how a detection in a context frame is matched to a subject, see
    `match_subjects`), face_categories (subjects that also get a face crop), face_backend
    ("dlib" | "insightface", with face_options), require_face (drop a person whose reference frame
    shows no face).
    Drops: "no frame outside the clip", "subject not in the reference frame", "no face in the
    reference frame", "no subjects".

    Run it before `verify`: the verifier then checks every reference against the subject in the
    target frames (MultiCrafter App. C compares the reference and target frames), which catches a
    reference cut from the wrong subject; an image candidate (one target frame) can only be
    verified against its reference. max_shift 0.25: toy subjects move up to ~0.2 of the frame
    diagonal between a shot's first and middle frames.
    """

    name = "references"
    RULES = ("outside-clip", "first-frame")

    def __init__(self, rule: str = "outside-clip", size: int | None = None, pad: float = 0.1,
                 detector="toyworld", segmenter="toyworld", detector_options: dict | None = None,
                 segmenter_options: dict | None = None, categories: Sequence[str] | Mapping[str, str] | None = None,
                 min_iou: float = 0.1, max_shift: float = 0.25, face_categories: Sequence[str] = PERSON_CATEGORIES,
                 face_backend: str = "dlib", face_options: dict | None = None, require_face: bool = False,
                 batch_size: int = 8, device: str = "cpu"):
        super().__init__()
        if rule not in self.RULES:
            raise ValueError(f"references: rule must be one of {', '.join(self.RULES)}, got {rule!r}")
        if size is not None and int(size) < 8:
            raise ValueError(f"references: size must be >= 8, got {size}")
        self.rule, self.size, self.pad = rule, None if size is None else int(size), float(pad)
        self.detector_spec, self.segmenter_spec = detector, segmenter
        self.detector_options, self.segmenter_options = dict(detector_options or {}), dict(segmenter_options or {})
        self.categories = None if categories is None else list(categories)  # a mapping gives its category names
        self.min_iou, self.max_shift = float(min_iou), float(max_shift)
        self.face_categories = frozenset(face_categories)
        self.face_backend_name, self.face_options = face_backend, dict(face_options or {})
        self.require_face = bool(require_face)
        self.batch_size, self.device = int(batch_size), device
        self.detector = self.segmenter = self.faces = None

    def setup(self) -> None:
        self.detector = _backend("detector", self.detector_spec, self.device, self.detector_options)
        self.segmenter = _backend("segmenter", self.segmenter_spec, self.device, self.segmenter_options)

    def _face_backend(self):
        if self.faces is None:
            self.faces = shared_face_backend(self.face_backend_name, self.device, **self.face_options)
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

    def _from_first_frame(self, c: Candidate) -> Outcome:
        """The candidate's own first frame as the reference frame; the candidate becomes its middle frame."""
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
        return c

    def _from_context(self, c: Candidate, context: list[int]) -> Outcome:
        """Each subject found in the context frames; its best view becomes its reference: the
        detection that fits the box extrapolated from the track best (a subject partly hidden,
        or merged with another into one detection, fits worse), then the frame furthest from the clip."""
        indices = c.frame_indices if c.frame_indices is not None else np.arange(c.start, c.start + len(c.frames))
        frames = np.stack([c.context[i] for i in context])
        categories = self.categories or sorted({s.category for s in c.subjects})
        detections = self.detector.detect(frames, categories)
        diagonal = float(np.hypot(*frames.shape[1:3]))
        best: list[tuple | None] = [None] * len(c.subjects)  # (fit, distance, context position, box, mask)
        for j, (index, found) in enumerate(zip(context, detections)):
            found = [d for d in found if d.category in categories]
            if not found:
                continue
            predicted = np.stack([extrapolate_box(s, indices, index) for s in c.subjects])
            boxes = np.stack([np.asarray(d.box, np.float64) for d in found])
            pairs = [(r, k) for r, k in match_subjects(predicted, boxes, diagonal, self.min_iou, self.max_shift)
                     if found[k].category == c.subjects[r].category]
            if not pairs:
                continue
            masks = self.segmenter.segment(frames[j:j + 1], [boxes[[k for _, k in pairs]]])[0]
            fit = box_iou(predicted, boxes)
            distance = min(abs(index - int(c.start)), abs(index - (int(c.end) - 1)))
            for (r, k), mask in zip(pairs, masks):
                view = (round(float(fit[r, k]), 2), distance, j, boxes[k], mask)
                if mask.any() and (best[r] is None or view[:2] > best[r][:2]):
                    best[r] = view
        for track, view in zip(c.subjects, best):
            if view is None:
                return Dropped(c, "subject not in the reference frame")
            _, _, j, box, mask = view
            reason = self._set_reference(track, frames[j], mask, box, context[j])
            if reason:
                return Dropped(c, reason)
        return c

    def process(self, batch: list[Candidate]) -> list[Outcome]:
        if not self._ready:  # called directly, not through `run`
            self.setup()
            self._ready = True
        out = []
        for c in batch:
            if not c.subjects:
                out.append(Dropped(c, "no subjects"))
                continue
            if self.rule == "first-frame" and c.frames is not None and len(c.frames) >= 2:
                result = self._from_first_frame(c)
            else:
                target = target_frames(c)
                context = sorted(int(i) for i in c.context if int(i) not in target)
                if self.rule == "first-frame":
                    context = context[:1]
                result = self._from_context(c, context) if context else Dropped(c, "no frame outside the clip")
            if isinstance(result, Candidate):
                # the rule of this stage: a reference never comes from the target's frames
                assert all(s.reference_frame not in target_frames(result) for s in result.subjects)
                result.info["reference_rule"] = self.rule
            out.append(result)
        return out
