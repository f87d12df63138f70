"""NexusScore (docs/design.md 7): does each subject appear, and does it look like its reference?

Per sampled frame, Grounding-DINO (transformers) finds each subject by its category word; the best
box per subject is cropped and embedded with CLIP or DINOv2, and compared with the reference:

    text      = "cat. dog."                                 (the sample's categories, deduplicated)
    p[q, c]   = max over the tokens of category c of sigmoid(logits[q, token])     (query q)
    boxes_c   = the n_c + extra highest-p queries with p >= box_threshold, greedy IoU <= nms_iou
                (n_c = how many subjects have category c; NexusScore: extra = 0, one box each)
    s_fk      = hungarian(cosine(ref_k, crops_c,f) clipped at 0)[k]    (refs and boxes of category c;
                0 where no box)
    Nexus     = mean_f [(1 - alpha) mean_k s_fk + alpha min_k s_fk]    (alpha 0: the mean over subjects)

With one subject per category this is "the best box per subject"; subjects sharing a category
(two people) get distinct boxes by the same Hungarian matching as the face reward. A subject with
no box in a frame scores 0 there and is counted in the warnings. `GroundedSubjectReward` holds all
of this; the `object` reward (`idcrafter.rewards.objects`) is the same with candidate boxes.

Not implemented: the optional SAM mask of the original NexusScore (crops are boxes, not masked).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from idcrafter.rewards.base import register_reward
from idcrafter.rewards.clip import make_image_embedder
from idcrafter.rewards.common import (
    SubjectReward,
    check_alpha,
    check_frame_options,
    model_dtype,
    require_path,
    sample_frames,
)
from idcrafter.rewards.identity import (
    cosine_similarity_matrix,
    hungarian_assignment,
    hungarian_identity_scores,
)

__all__ = ["GroundedSubjectReward", "GroundingDINODetector", "NexusReward", "SubjectMatches", "box_iou", "crop_box",
           "grounding_text", "pixel_boxes"]


def grounding_text(categories: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Grounding-DINO's prompt for some categories and each one's character span in it:
    ["cat", "dog"] -> ("cat. dog.", [(0, 3), (5, 8)])."""
    text, spans = "", []
    for c in categories:
        spans.append((len(text), len(text) + len(c)))
        text += c + ". "
    return text.rstrip(), spans


def pixel_boxes(boxes: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Grounding-DINO boxes [N, 4] (cx, cy, w, h) in [0, 1] -> int64 [N, 4] (x0, y0, x1, y1) pixels,
    outward-rounded and clamped to the image, at least one pixel wide and high."""
    b = boxes.detach().double().cpu().numpy().reshape(-1, 4)
    x0 = np.floor(np.clip(b[:, 0] - b[:, 2] / 2, 0, 1) * width)
    x1 = np.ceil(np.clip(b[:, 0] + b[:, 2] / 2, 0, 1) * width)
    y0 = np.floor(np.clip(b[:, 1] - b[:, 3] / 2, 0, 1) * height)
    y1 = np.ceil(np.clip(b[:, 1] + b[:, 3] / 2, 0, 1) * height)
    x0, y0 = np.minimum(x0, width - 1), np.minimum(y0, height - 1)
    out = np.stack([x0, y0, np.maximum(x1, x0 + 1), np.maximum(y1, y0 + 1)], axis=1)
    return out.astype(np.int64)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def crop_box(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = (int(v) for v in box)
    return np.ascontiguousarray(image[y0:y1, x0:x1])


class GroundingDINODetector:
    """transformers Grounding-DINO (`AutoModelForZeroShotObjectDetection` + `AutoProcessor`) from a
    local folder: `detect(frames, counts)` -> per frame, category -> (boxes int64 [n, 4], scores [n])."""

    def __init__(self, path: str | os.PathLike | None, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, box_threshold: float = 0.35, nms_iou: float = 0.5,
                 reward: str = "nexus"):
        self.path = require_path(reward, path, "a local Grounding-DINO folder saved with save_pretrained")
        self.device, self.dtype = torch.device(device), model_dtype(dtype)
        self.box_threshold, self.nms_iou = float(box_threshold), float(nms_iou)
        self.model = self.processor = None

    def load(self) -> GroundingDINODetector:
        if self.model is None:
            from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(
                str(self.path), dtype=self.dtype, local_files_only=True)
            self.model = self.model.to(self.device).eval().requires_grad_(False)
            # Without torchvision, transformers falls back to the PIL image processor by itself.
            self.processor = AutoProcessor.from_pretrained(str(self.path), local_files_only=True)
        return self

    @torch.no_grad()
    def phrase_scores(self, frames: list[np.ndarray], categories: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """frames: F RGB images of one size; categories: C words -> (scores [F, Q, C], boxes [F, Q, 4])."""
        self.load()
        text, spans = grounding_text(categories)
        # Tokenise once, with offsets, so every category knows its token positions in the model's input.
        tokens = self.processor.tokenizer([text] * len(frames), return_offsets_mapping=True, return_tensors="pt")
        offsets = tokens.pop("offset_mapping")[0]
        pixels = self.processor.image_processor(images=list(frames), return_tensors="pt")
        inputs = {**{k: v.to(self.device) for k, v in tokens.items()},
                  "pixel_values": pixels["pixel_values"].to(self.device, self.dtype),
                  "pixel_mask": pixels["pixel_mask"].to(self.device)}
        out = self.model(**inputs)
        probs = out.logits.float().sigmoid()  # [F, Q, max_text_len], -inf (0) past the text
        columns = []
        for start, end in spans:
            idx = [t for t, (s, e) in enumerate(offsets.tolist()) if e > s and s >= start and e <= end]
            idx = [t for t in idx if t < probs.shape[-1]]
            columns.append(probs[..., idx].amax(-1) if idx else probs.new_zeros(probs.shape[:2]))
        return torch.stack(columns, -1).cpu(), out.pred_boxes.float().cpu()

    def detect(self, frames: list[np.ndarray], counts: dict[str, int]) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
        """The boxes of each category in each frame: up to counts[c], best first (see the module doc)."""
        if not frames:
            return []
        categories = list(counts)
        scores, boxes = self.phrase_scores(frames, categories)
        height, width = frames[0].shape[:2]
        result = []
        for f in range(len(frames)):
            frame_boxes = pixel_boxes(boxes[f], height, width)
            found = {}
            for c, category in enumerate(categories):
                p = scores[f, :, c].numpy()
                keep: list[int] = []
                for q in np.argsort(-p, kind="stable"):
                    if p[q] < self.box_threshold or len(keep) == counts[category]:
                        break
                    if all(box_iou(frame_boxes[q], frame_boxes[k]) <= self.nms_iou for k in keep):
                        keep.append(int(q))
                found[category] = (frame_boxes[keep].reshape(-1, 4), p[keep].astype(np.float32))
            result.append(found)
        return result


@dataclass
class SubjectMatches:
    """The matching of one video: scores float64 [F, R] (0 where unmatched) and boxes int64 [F, R, 4]
    (x0, y0, x1, y1) of the detection each reference took in each sampled frame (-1 where none)."""

    scores: np.ndarray
    boxes: np.ndarray


class GroundedSubjectReward(SubjectReward):
    """Subjects found by their category word with Grounding-DINO, embedded crops matched to the references.

    Per sampled frame and category c: up to n_c + `extra_boxes` boxes (n_c = the references of
    category c), every box cropped and embedded, then the references of c matched to the crops of c
    by the Hungarian assignment of the face reward (cosine clipped at `clip_min`); a reference left
    without a box scores 0 there. R = mean_f [(1 - alpha) mean_k s_fk + alpha min_k s_fk].
    """

    extra_boxes: int = 0

    def __init__(self, path=None, embedder: str = "clip", embedder_path=None, box_threshold: float = 0.35,
                 nms_iou: float = 0.5, alpha: float | None = None, mode: str | None = None, default_alpha: float = 0.0,
                 extra_boxes: int = 0, clip_min: float = 0.0, stride: int = 1, max_frames: int | None = 8,
                 device: str | torch.device = "cpu", dtype=None):
        super().__init__(device)
        self.detector = GroundingDINODetector(path, device, dtype, box_threshold, nms_iou, reward=self.name)
        self.embedder = make_image_embedder(embedder, embedder_path, device, dtype, reward=self.name)
        self.alpha = check_alpha(self.name, alpha, mode, default=default_alpha)
        try:
            self.extra_boxes, self.clip_min = int(extra_boxes), float(clip_min)
        except (TypeError, ValueError):
            raise ValueError(f"reward {self.name!r}: extra_boxes must be an integer and clip_min a number, "
                             f"got {extra_boxes!r}, {clip_min!r}") from None
        if self.extra_boxes < 0:
            raise ValueError(f"reward {self.name!r}: extra_boxes must be >= 0, got {extra_boxes}")
        self.stride, self.max_frames = check_frame_options(self.name, stride, max_frames)

    def categories(self, meta: dict, count: int) -> list[str]:
        """meta["categories"] (one per reference, lower-cased) or, when absent or empty, "object" for each."""
        cats = meta.get("categories") if meta else None
        if cats is None or (not isinstance(cats, str) and len(cats) == 0):
            return ["object"] * count
        if isinstance(cats, str) or len(cats) != count:
            raise ValueError(f"reward {self.name!r}: meta['categories'] must list one word per reference ({count}), "
                             f"got {cats!r}")
        return [" ".join(str(c).lower().split()).rstrip(".") or "object" for c in cats]

    def match(self, video: np.ndarray, refs: list[np.ndarray], meta: dict, warnings: Counter) -> SubjectMatches:
        """Detect, crop, embed and match the subjects of one video uint8 [F, H, W, 3] (see the class doc)."""
        frames = list(sample_frames(video, self.stride, self.max_frames))
        scores = np.zeros((len(frames), len(refs)), np.float64)
        boxes = np.full((len(frames), len(refs), 4), -1, np.int64)
        if not refs:
            warnings["no reference images"] += 1
            return SubjectMatches(scores, boxes)
        cats = self.categories(meta, len(refs))
        counts = Counter(cats)
        detections = self.detector.detect(frames, {c: n + self.extra_boxes for c, n in counts.items()})
        crops = [(f, c, b) for f, found in enumerate(detections) for c, (bs, _) in found.items() for b in bs]
        emb = self.embedder.images(list(refs) + [crop_box(frames[f], b) for f, _, b in crops])
        ref_emb, crop_emb = emb[: len(refs)], emb[len(refs):]
        for category in counts:
            members = [k for k, c in enumerate(cats) if c == category]
            for f in range(len(frames)):
                rows = [i for i, (g, c, _) in enumerate(crops) if g == f and c == category]
                if len(rows) < len(members):
                    warnings["no detection of a subject in a frame"] += len(members) - len(rows)
                if not rows:
                    continue
                sim = cosine_similarity_matrix(ref_emb[members].double(), crop_emb[rows].double()).numpy()
                scores[f, members] = hungarian_identity_scores(sim, self.clip_min)
                for k, j in zip(members, hungarian_assignment(sim, self.clip_min)):
                    if j is not None:
                        boxes[f, k] = crops[rows[j]][2]
        return SubjectMatches(scores, boxes)

    def frame_scores(self, samples, prompts, refs, meta, warnings):
        return [self.match(v, r, m, warnings).scores for v, r, m in zip(samples, refs, meta)]


@register_reward("nexus")
class NexusReward(GroundedSubjectReward):
    """NexusScore: Grounding-DINO box per subject (by meta["categories"], default "object"), crop
    vs reference cosine with CLIP or DINOv2, averaged over subjects and sampled frames.

    Options: path (Grounding-DINO folder), embedder ("clip" | "dino"), embedder_path (its folder),
    box_threshold (0.35), nms_iou (0.5), alpha (weight of the worst subject, 0: the mean; as `face`),
    mode (the older name: "mean" | "min" | "mean_min"), stride, max_frames, device, dtype.
    Components: nexus, nexus_mean, nexus_min.
    """

    name = "nexus"

    def __init__(self, path=None, embedder: str = "clip", embedder_path=None, box_threshold: float = 0.35,
                 nms_iou: float = 0.5, alpha: float | None = None, mode: str | None = None, stride: int = 1,
                 max_frames: int | None = 8, device: str | torch.device = "cpu", dtype=None):
        super().__init__(path, embedder, embedder_path, box_threshold, nms_iou, alpha, mode, default_alpha=0.0,
                         extra_boxes=0, stride=stride, max_frames=max_frames, device=device, dtype=dtype)
